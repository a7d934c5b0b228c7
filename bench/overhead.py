"""Python's own cost per generated token, with llama.cpp's cost taken out.

    $ python bench/overhead.py                      # 128, 2048 and 3500 tokens
    $ python bench/overhead.py --tokens 4096 --repeat 5

The model here is the real SmolLM2 (vocabulary, chat template, llama-cpp-python's code), except that
eval() decodes nothing and sample() replays a fixed stream of real text tokens. What remains of each
variant's time per token is the Python around llama.cpp: on a GPU, where a whole token of this model
takes ~1.25 ms (~800 tok/s), that is what separates the server from a bare generate() loop. The
last column projects each variant's decode speed at that GPU rate, relative to the loop:
1250 us / (1250 us + the variant's extra us per token).

  loop          Llama.generate(), nothing else
  stock         create_chat_completion(stream=True) with llama-cpp-python's own tokenizer
  server-model  the same call on the server's model (its tokenizer and its usage counting)
  server-path   what the server runs per request short of HTTP: Generation on the llama thread,
                the event loop taking the chunks and encoding them as SSE events
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import llama_cpp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import llmapiserver as las  # noqa: E402

GPU_US_PER_TOKEN = 1250.0  # SmolLM2 on an H100: ~800 tok/s (the measurement)
TEXT = ("The lighthouse keeper climbed the stairs at dusk, as he had done every evening for thirty "
        "years, and lit the great lamp that warned the ships away from the rocks below. ") * 4


class Replay:
    """Mixed into a Llama: eval() skips the decode, sample() replays `stream` round and round."""

    stream: list[int] = []
    _next = 0

    def eval(self, tokens):  # type: ignore[override]
        self.input_ids[self.n_tokens:self.n_tokens + len(tokens)] = tokens
        self.n_tokens += len(tokens)

    def sample(self, *args, **kwargs):  # type: ignore[override]
        token = self.stream[self._next % len(self.stream)]
        self._next += 1
        return token


class StockReplay(Replay, llama_cpp.Llama):
    pass


class ServedReplay(Replay, las.ServedLlama):
    pass


def load(cls: type, settings: las.Settings, served: bool) -> llama_cpp.Llama:
    llm = cls(model_path=settings.model_path, n_ctx=8192, n_threads=1, verbose=False)
    if served:
        llm.tokenizer_ = las.PieceCacheTokenizer(llm)
    llm.stream = llm.tokenize(TEXT.encode(), add_bos=False)
    return llm


MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


def per_token_loop(llm: llama_cpp.Llama, n: int) -> float:
    prompt = llm.tokenize(b"Tell me a long story.")
    started = time.perf_counter()
    for i, _ in enumerate(llm.generate(prompt, temp=0), 1):
        if i >= n:
            break
    return (time.perf_counter() - started) / n


def per_token_chat(llm: llama_cpp.Llama, n: int) -> float:
    started = time.perf_counter()
    for _ in llm.create_chat_completion(messages=MESSAGES, max_tokens=n, temperature=0, stream=True):
        pass
    return (time.perf_counter() - started) / n


def per_token_server_path(llm: las.ServedLlama, worker, n: int) -> float:
    async def one() -> float:
        gate = las.Gate(1)
        await gate.acquire()
        started = time.perf_counter()
        kwargs = {"messages": MESSAGES, "max_tokens": n, "temperature": 0}
        generation = las.Generation(llm, las.Job(kwargs), gate.release, las.Stats(), worker, las.Shutdown(10))
        first = await generation.next_chunks()
        async for _ in las.sse_events(generation, first, las.ChatAPI(include_usage=True), 8192):
            pass
        await generation.stats.done.wait()
        return (time.perf_counter() - started) / n

    return asyncio.run(one())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="128,2048,3500")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; the median counts")
    args = parser.parse_args()
    settings = las.load_settings([])
    worker = las.llama_thread()
    stock = load(StockReplay, settings, served=False)
    served = worker.submit(load, ServedReplay, settings, True).result()

    variants = {
        "loop": lambda n: per_token_loop(stock, n),
        "stock": lambda n: per_token_chat(stock, n),
        "server-model": lambda n: per_token_chat(served, n),
        "server-path": lambda n: per_token_server_path(served, worker, n),
    }
    print(f"llama-cpp-python {llama_cpp.__version__}; us per token, median of {args.repeat}; "
          f"projected = decode speed relative to the loop at {GPU_US_PER_TOKEN:.0f} us/token of llama.cpp work")
    for n in (int(t) for t in args.tokens.split(",")):
        print(f"\n## {n} tokens\n{'variant':<13} {'us/token':>9} {'extra us':>9} {'projected':>10}")
        times = {name: statistics.median(run(n) for _ in range(args.repeat)) * 1e6 for name, run in variants.items()}
        for name, us in times.items():
            extra = us - times["loop"]
            print(f"{name:<13} {us:>9.1f} {extra:>9.1f} {GPU_US_PER_TOKEN / (GPU_US_PER_TOKEN + extra):>10.3f}")
    worker.shutdown()


if __name__ == "__main__":
    main()
