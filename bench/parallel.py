"""Parallel slots: llmapiserver PARALLEL=N against llama-server -np N, in interleaved rounds.

    $ python bench/parallel.py --llama-server bench/.llama-server/cmake/bin/llama-server
    $ python bench/parallel.py --llama-server ... --clients 8 --parallel 8 --n-gpu-layers -1   # a GPU

Every server is started once and stays up; each round runs every scenario on every variant, one
variant at a time (never two servers generating at once):
  concurrent   C streaming clients at once, each sending R requests of T tokens one after another:
               aggregate decode tok/s (all tokens / wall time), median time to first token, and
               whether every stream completed ([DONE] and T tokens)
  single       one stream of T tokens: tok/s, to compare PARALLEL=N with PARALLEL=1 (the engine
               must not tax one user)
  multiturn    C users interleaved, each sending K turns that resend the conversation so far
               (turn k carries turns 1..k-1 and their answers): time to first token of the last
               turn, against one user alone doing the same
Variants: server-pN (llmapiserver, PARALLEL=N), server-p1 (PARALLEL=1), llama-server-npN (same
model, threads, batch and per-slot context: -c N*N_CTX, since llama-server splits -c among slots).
Greedy, seed 1, end-of-generation tokens banned so every answer has exactly the asked length.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import llama_cpp  # noqa: E402

import llmapiserver as las  # noqa: E402
from bench import machine, start  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["a lighthouse keeper", "a desert caravan", "a mountain village", "a space station", "an old library",
          "a river boat", "a clockmaker", "a winter forest"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stream(url: str, messages: list[dict], max_tokens: int, bias: dict) -> tuple[float, float, int, bool, str]:
    """One SSE request over a raw socket: (ttft, total seconds, content events, [DONE] seen, text).
    Both servers' events are parsed the same way (llama-server's first delta has content null,
    ours ""): the first token is the first non-empty content."""
    parts = urllib.parse.urlsplit(url)
    payload = json.dumps({"messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0,
                          "seed": 1, "logit_bias": bias}).encode()
    request = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
    started, first, pending, text, events, done = time.perf_counter(), None, b"", "", 0, False
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(request)
        while not done and (data := sock.recv(65536)):
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                line = line.strip()
                if line == b"data: [DONE]":
                    done = True
                elif line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    content = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                    if content:
                        first = first or time.perf_counter()
                        text += content
                        events += 1
    total = time.perf_counter() - started
    return (first or time.perf_counter()) - started, total, events, done, text


def concurrent_run(url: str, clients: int, requests: int, tokens: int, bias: dict) -> dict:
    def client(i: int) -> list[tuple]:
        return [stream(url, [{"role": "user", "content": f"Write a long story about {TOPICS[(i + r) % len(TOPICS)]}."}],
                       tokens, bias) for r in range(requests)]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [run for runs in pool.map(client, range(clients)) for run in runs]
    wall = time.perf_counter() - started
    return {"tok/s": clients * requests * tokens / wall, "ttft": statistics.median(r[0] for r in results),
            "complete": all(r[3] for r in results)}


def single_run(url: str, tokens: int, bias: dict) -> dict:
    ttft, total, _, done, _ = stream(url, [{"role": "user", "content": "Write a long story about the sea."}],
                                     tokens, bias)
    return {"tok/s": tokens / (total - ttft) if total > ttft else float("nan"), "ttft": ttft, "complete": done}


def multiturn_run(url: str, users: int, turns: int, tokens: int, bias: dict) -> dict:
    """Each user's conversation grows turn by turn; the users' turns are interleaved."""
    def conversation(i: int) -> float:
        messages: list[dict] = []
        ttft = 0.0
        for k in range(turns):
            messages.append({"role": "user", "content": f"Tell me more about {TOPICS[(i + k) % len(TOPICS)]}."})
            ttft, _, _, _, text = stream(url, messages, tokens, bias)
            messages.append({"role": "assistant", "content": text})
        return ttft

    with concurrent.futures.ThreadPoolExecutor(users) as pool:
        last = list(pool.map(conversation, range(users)))
    return {"ttft": statistics.median(last), "complete": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", help="path to llama.cpp's llama-server (bench/build_llama_server.sh)")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--turn-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-ctx", type=int, default=2048, help="per request (per slot)")
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--flash-attn", default="auto", help="auto, on or off, for every server (llama-server: its "
                        "own auto unless on/off); on a CPU flash attention speeds short contexts and slows long ones")
    args = parser.parse_args()
    settings = las.load_settings(["--n-ctx", str(args.n_ctx), "--n-gpu-layers", str(args.n_gpu_layers)])
    vocab_llm = llama_cpp.Llama(model_path=settings.model_path, vocab_only=True, verbose=False)
    bias = {str(t): -100.0 for t in range(vocab_llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab_llm._model.vocab, t)}
    print(machine())
    print(f"model {Path(settings.model_path).name}, {settings.n_threads} threads, N_CTX {args.n_ctx} per request, "
          f"{args.clients} clients x {args.requests} x {args.tokens} tokens, {args.turns} turns of {args.turn_tokens}, "
          f"flash attention {args.flash_attn}")

    servers, procs = {}, []
    common = ["--n-ctx", str(args.n_ctx), "--n-gpu-layers", str(args.n_gpu_layers), "--max-queue", "64",
              "--flash-attn", args.flash_attn]
    for name, parallel in ((f"server-p{args.parallel}", args.parallel), ("server-p1", 1)):
        port = free_port()
        procs.append(start([sys.executable, str(ROOT / "llmapiserver.py"), "--port", str(port), "--parallel",
                            str(parallel), *common], {}, port))
        servers[name] = f"http://127.0.0.1:{port}/v1/chat/completions"
    if args.llama_server:
        port = free_port()
        layers = "all" if args.n_gpu_layers < 0 else str(args.n_gpu_layers)
        procs.append(start([args.llama_server, "--model", settings.model_path, "--port", str(port), "--host",
                            "127.0.0.1", "--ctx-size", str(args.n_ctx * args.parallel), "--parallel",
                            str(args.parallel), "--threads", str(settings.n_threads), "--threads-batch",
                            str(settings.n_threads), "--batch-size", str(settings.n_batch), "--n-gpu-layers",
                            layers, "--no-webui", "--flash-attn", args.flash_attn], {}, port))
        servers[f"llama-server-np{args.parallel}"] = f"http://127.0.0.1:{port}/v1/chat/completions"

    results: dict[tuple[str, str], list[dict]] = {}
    try:
        for _ in range(args.rounds):
            for name, url in servers.items():
                results.setdefault(("concurrent", name), []).append(
                    concurrent_run(url, args.clients, args.requests, args.tokens, bias))
                results.setdefault(("single", name), []).append(single_run(url, args.tokens, bias))
                results.setdefault(("multiturn", name), []).append(
                    multiturn_run(url, args.clients, args.turns, args.turn_tokens, bias))
                results.setdefault(("multiturn-alone", name), []).append(
                    multiturn_run(url, 1, args.turns, args.turn_tokens, bias))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)

    print(f"\nmedians of {args.rounds} rounds")
    print(f"{'scenario':<16} {'variant':<22} {'tok/s':>8} {'ttft s':>8} complete")
    for (scenario, name), runs in results.items():
        rate = statistics.median(r.get("tok/s", float("nan")) for r in runs)
        ttft = statistics.median(r["ttft"] for r in runs)
        print(f"{scenario:<16} {name:<22} {rate:>8.1f} {ttft:>8.3f} {all(r['complete'] for r in runs)}")

    def med(scenario: str, name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(scenario, name)])

    ours, one = f"server-p{args.parallel}", "server-p1"
    print("\nratios")
    print(f"single stream, PARALLEL={args.parallel} / PARALLEL=1 tok/s: "
          f"{med('single', ours, 'tok/s') / med('single', one, 'tok/s'):.3f}  (target >= 0.95)")
    print(f"multi-turn last-turn TTFT, {args.clients} users / 1 user: "
          f"{med('multiturn', ours, 'ttft') / med('multiturn-alone', ours, 'ttft'):.3f}  (target <= 1.2)")
    llama = f"llama-server-np{args.parallel}"
    if (("concurrent", llama)) in results:
        print(f"concurrent aggregate tok/s, ours / llama-server: "
              f"{med('concurrent', ours, 'tok/s') / med('concurrent', llama, 'tok/s'):.3f}  (target >= 1.0)")
        print(f"concurrent median TTFT, ours / llama-server: "
              f"{med('concurrent', ours, 'ttft') / med('concurrent', llama, 'ttft'):.3f}  (target <= 1.2)")
        print(f"multi-turn last-turn TTFT, ours / llama-server: "
              f"{med('multiturn', ours, 'ttft') / med('multiturn', llama, 'ttft'):.3f}")


if __name__ == "__main__":
    main()
