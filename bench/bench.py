"""Benchmark llmapiserver against calling llama.cpp in-process, on one machine, in one run.

    $ python bench/bench.py                                  # 256 tokens, 5 interleaved rounds
    $ python bench/bench.py --tokens 128,2048,4096 --rounds 3 --n-ctx 8192
    $ python bench/bench.py --concurrency 8 --tokens 128     # C clients at once
    $ MODEL_PATH=/models/m.gguf python bench/bench.py --n-gpu-layers -1
    $ python bench/bench.py --llama-server /path/to/llama-server    # adds llama.cpp's own server

Each round runs every variant once, one after another (never two generations at once):
  loop        a bare Llama.generate() loop with the server's settings: the model's own cost
  loop-default  the same loop with llama-cpp-python's own defaults (threads, flash attention)
  inprocess   Llama.create_chat_completion(stream=True), what the server calls
  floor       a do-nothing raw-socket HTTP server around that same call (bench/floor_server.py)
  server      llmapiserver over HTTP, SSE streaming
  server-json llmapiserver over HTTP, non-streaming
  llama-server  llama.cpp's C++ server over HTTP, streaming, with the server's settings (only with
              --llama-server: build it from the llama.cpp sources vendored in the installed
              llama-cpp-python, see bench/README.md)
  llama-server-default  the same binary with its own defaults (model, context and GPU layers only)
Greedy decoding, a fixed seed, and the end-of-generation tokens banned (logit_bias, in every
variant) so each run produces exactly --tokens tokens. Prints medians and the ratios; the headline
ratios are against the best baseline of each round, not the one with matching settings: a setting
that slows both sides of a ratio would not show in it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx
import llama_cpp
from llama_cpp import llama_chat_format

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import llmapiserver as las  # noqa: E402

PROMPT = "Write a very long and detailed story about a lighthouse keeper and the sea."


@dataclass
class Run:
    ttft: float  # seconds from sending to the first content token
    decode: float  # tokens/s between the first and the last content token
    total: float  # seconds for the whole request
    tokens: int


def ban_eog(llm: llama_cpp.Llama) -> dict[str, float]:
    eog = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t)]
    return {str(t): -100.0 for t in eog}


def body(max_tokens: int, bias: dict, stream: bool) -> dict:
    return {"model": "bench", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "seed": 1, "logit_bias": bias, "stream": stream}


def timed(first: float | None, last: float, started: float, tokens: int) -> Run:
    first = first or last
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return Run(first - started, decode, last - started, tokens)


def run_loop(llm: llama_cpp.Llama, prompt: list[int], max_tokens: int, bias: dict) -> Run:
    processor = llama_cpp.LogitsProcessorList([_bias_processor(bias)])
    started, first, n = time.perf_counter(), None, 0
    for _ in llm.generate(prompt, temp=0, top_k=40, top_p=1.0, min_p=0.05, logits_processor=processor):
        n += 1
        first = first or time.perf_counter()
        if n >= max_tokens:
            break
    return timed(first, time.perf_counter(), started, n)


def _bias_processor(bias: dict):
    ids = [int(k) for k in bias]

    def processor(input_ids, scores):  # what llama-cpp-python does for logit_bias
        new = scores.copy()
        new[ids] += -100.0
        return new

    return processor


def run_inprocess(llm: llama_cpp.Llama, max_tokens: int, bias: dict) -> Run:
    kwargs = body(max_tokens, bias, True)
    kwargs.pop("stream")
    started, first, n = time.perf_counter(), None, 0
    for chunk in llm.create_chat_completion(stream=True, **kwargs):
        if chunk["choices"][0]["delta"].get("content"):
            n += 1
            first = first or time.perf_counter()
            last = time.perf_counter()
    return timed(first, last, started, max_tokens)


def run_stream(client: httpx.Client, url: str, max_tokens: int, bias: dict) -> Run:
    """A raw-socket SSE client: on 2 cores a client's own CPU use shows up in the server's rate,
    so it only looks for content and [DONE] in the bytes (both servers get the same client)."""
    parts = urllib.parse.urlsplit(url)
    payload = json.dumps(body(max_tokens, bias, True)).encode()
    request = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload
    started, first, last = time.perf_counter(), None, 0.0
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(request)
        tail = b""
        while data := sock.recv(65536):
            if b'"content"' in data:
                last = time.perf_counter()
                first = first or last
            tail = (tail + data)[-64:]
            if b"[DONE]" in tail:
                break
    return timed(first, last, started, max_tokens)


def run_json(client: httpx.Client, url: str, max_tokens: int, bias: dict) -> Run:
    started = time.perf_counter()
    answer = client.post(url, json=body(max_tokens, bias, False))
    answer.raise_for_status()
    total = time.perf_counter() - started
    tokens = answer.json()["usage"]["completion_tokens"]
    return Run(float("nan"), tokens / total, total, tokens)


def start(cmd: list[str], env: dict, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    name = " ".join(cmd[:2])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:  # llama-server: 503 while loading
                return proc
        time.sleep(0.2)
    raise SystemExit(f"{name} did not start")


def llama_server_command(binary: str, settings: las.Settings, port: int, flash_attn: bool | None) -> list[str]:
    """llama.cpp's server: with flash_attn None at its own defaults (model, context and layers
    only), else with the settings llmapiserver gets: one slot, same threads, batch and flash attention."""
    layers = "all" if settings.n_gpu_layers < 0 else str(settings.n_gpu_layers)
    cmd = [binary, "--model", settings.model_path, "--host", "127.0.0.1", "--port", str(port),
           "--ctx-size", str(settings.n_ctx), "--n-gpu-layers", layers, "--no-webui"]
    if flash_attn is None:
        return cmd
    return cmd + ["--batch-size", str(settings.n_batch), "--threads", str(settings.n_threads),
                  "--threads-batch", str(settings.n_threads), "--flash-attn", "on" if flash_attn else "off",
                  "--parallel", "1"]


def machine() -> str:
    """CPU model, cores, and the GPU if the layers run on one: every figure names its machine."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    simd = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    gpu = "none (CPU-only build)"
    if llama_cpp.llama_supports_gpu_offload():
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, check=True).stdout.strip() or "GPU build, no GPU named"
    return (f"CPU {cpu} ({simd}), {os.cpu_count()} logical CPUs, {las.physical_cores()} physical cores; "
            f"GPU {gpu}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def model_only_rss(model_args: dict, max_tokens: int) -> float:
    """RSS of a bare process that loads the same model and generates once: the model's own share."""
    code = (f"import llama_cpp, json; llm = llama_cpp.Llama(verbose=False, **json.loads({json.dumps(json.dumps(model_args))}));"
            f"list(llm.create_chat_completion(messages=[{{'role': 'user', 'content': 'hi'}}], max_tokens={max_tokens}, stream=True));"
            "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def median(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def single_stream(args, llm, default_llm, settings, bias, urls) -> None:
    template = llm.metadata["tokenizer.chat_template"]
    formatter = llama_chat_format.Jinja2ChatFormatter(template, eos_token="", bos_token="")
    prompt = llm.tokenize(formatter(messages=[{"role": "user", "content": PROMPT}]).prompt.encode(), special=True)
    with httpx.Client(timeout=600) as client:
        for tokens in args.tokens:
            results: dict[str, list[Run]] = {
                k: [] for k in ("loop", "loop-default", "inprocess", "floor", "server", "server-json",
                                "llama-server", "llama-server-default")}
            run_json(client, urls["server"], 8, bias)  # warm every server
            for name in ("server", "floor", "llama-server", "llama-server-default"):
                if name in urls:
                    run_stream(client, urls[name], 8, bias)
            for _ in range(args.rounds):
                results["loop"].append(run_loop(llm, prompt, tokens, bias))
                results["loop-default"].append(run_loop(default_llm, prompt, tokens, bias))
                results["inprocess"].append(run_inprocess(llm, tokens, bias))
                results["floor"].append(run_stream(client, urls["floor"], tokens, bias))
                results["server"].append(run_stream(client, urls["server"], tokens, bias))
                if not args.no_json:
                    results["server-json"].append(run_json(client, urls["server"], tokens, bias))
                for name in ("llama-server", "llama-server-default"):
                    if name in urls:
                        results[name].append(run_stream(client, urls[name], tokens, bias))
            report(tokens, results, args.rounds)


def report(tokens: int, results: dict[str, list[Run]], rounds: int) -> None:
    print(f"\n## {tokens} tokens, medians of {rounds} interleaved rounds")
    print(f"{'variant':<20} {'decode tok/s':>12} {'ttft ms':>8} {'total s':>8}")
    for name, runs in results.items():
        if runs and not name.startswith("best-"):
            print(f"{name:<20} {median(runs, 'decode'):>12.1f} {median(runs, 'ttft') * 1000:>8.1f} "
                  f"{median(runs, 'total'):>8.2f}")
    # Ratios are taken within each round, then the median: the machine's speed drifts between rounds.
    def ratio(a: str, b: str, attr: str = "decode") -> float:
        return statistics.median(getattr(x, attr) / getattr(y, attr) for x, y in zip(results[a], results[b]))

    def overhead_ms(a: str, b: str) -> float:
        return statistics.median((x.ttft - y.ttft) * 1000 for x, y in zip(results[a], results[b]))

    def best(*names: str) -> None:  # the fastest of these baselines, round by round
        key = "best-" + names[0]
        results[key] = [max(runs, key=lambda r: r.decode) for runs in zip(*(results[n] for n in names))]

    best("loop", "loop-default")
    print(f"HEADLINE server stream decode / best loop : {ratio('server', 'best-loop'):.3f}")
    if results["server-json"]:
        print(f"HEADLINE server JSON tok/s / best loop    : {ratio('server-json', 'best-loop'):.3f}")
    if results["llama-server-default"]:
        best("llama-server", "llama-server-default")
        print(f"HEADLINE server stream / best llama-server: {ratio('server', 'best-llama-server'):.3f}")
        print(f"HEADLINE ttft server - best llama-server  : {overhead_ms('server', 'best-llama-server'):.1f} ms")
    print(f"loop with server settings / loop defaults : {ratio('loop', 'loop-default'):.3f}")
    print(f"server stream decode / in-process stream  : {ratio('server', 'inprocess'):.3f}")
    print(f"server stream decode / floor server       : {ratio('server', 'floor'):.3f}")
    print(f"server stream decode / generate() loop    : {ratio('server', 'loop'):.3f}")
    print(f"in-process stream decode / generate() loop: {ratio('inprocess', 'loop'):.3f}")
    print(f"time to first token, server - in-process  : {overhead_ms('server', 'inprocess'):.1f} ms")
    print(f"time to first token, server - floor       : {overhead_ms('server', 'floor'):.1f} ms")
    if results["server-json"]:
        print(f"server non-stream tok/s / generate() loop : {ratio('server-json', 'loop'):.3f}")
        print(f"non-stream latency / in-process stream    : {ratio('server-json', 'inprocess', 'total'):.3f}")
    if results["llama-server"]:
        print(f"llama-server defaults / its server settings: {ratio('llama-server-default', 'llama-server'):.3f}")
        print(f"server stream decode / llama-server       : {ratio('server', 'llama-server'):.3f}")
        print(f"llama-server decode / generate() loop     : {ratio('llama-server', 'loop'):.3f}")
        print(f"time to first token, server - llama-server: {overhead_ms('server', 'llama-server'):.1f} ms")
    sys.stdout.flush()


def concurrent(args, bias, url) -> None:
    tokens = args.tokens[0]
    with httpx.Client(timeout=600) as client:
        single = statistics.median(run_stream(client, url, tokens, bias).decode for _ in range(3))
    runs: list[Run | Exception] = []

    def one() -> None:
        with httpx.Client(timeout=600) as client:
            try:
                runs.append(run_stream(client, url, tokens, bias))
            except Exception as exc:  # counted as an incomplete stream
                runs.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    done = [r for r in runs if isinstance(r, Run)]
    latencies = sorted(r.total for r in done)
    aggregate = sum(r.tokens for r in done) / wall
    print(f"\n## {args.concurrency} concurrent clients x {tokens} tokens")
    print(f"completed streams: {len(done)}/{args.concurrency}")
    print(f"aggregate tok/s: {aggregate:.1f}   single-stream tok/s: {single:.1f}   ratio: {aggregate / single:.3f}")
    print(f"latency p50: {latencies[len(latencies) // 2]:.2f} s   p95: {latencies[int(len(latencies) * 0.95) - 1 if len(latencies) > 1 else 0]:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="256", help="comma-separated output lengths")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=0, help="C clients at once instead of single-stream")
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--n-gpu-layers", type=int, default=-1)
    parser.add_argument("--no-json", action="store_true", help="skip the non-streaming variant")
    parser.add_argument("--port", type=int, default=8931)
    parser.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary to compare with")
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]

    settings = las.load_settings(["--n-ctx", str(args.n_ctx), "--n-gpu-layers", str(args.n_gpu_layers),
                                  "--max-queue", str(max(16, args.concurrency))])
    flash_attn, why = las.choose_flash_attn(settings.flash_attn, llama_cpp.llama_supports_gpu_offload(),
                                            settings.n_gpu_layers)
    model_args = dict(model_path=settings.model_path, n_ctx=settings.n_ctx, n_batch=settings.n_batch,
                      n_threads=settings.n_threads, n_threads_batch=settings.n_threads,
                      n_gpu_layers=settings.n_gpu_layers, flash_attn=flash_attn)
    # llama-cpp-python's defaults, but for what no one leaves at its default: the file, the context, the GPU.
    default_args = dict(model_path=settings.model_path, n_ctx=settings.n_ctx, n_gpu_layers=settings.n_gpu_layers)
    print(f"machine: {machine()}\nmodel {settings.model_path}\nserver settings: threads {settings.n_threads}, "
          f"n_ctx {settings.n_ctx}, flash_attn {flash_attn} ({why}), n_gpu_layers {settings.n_gpu_layers}, "
          f"llama-cpp-python {llama_cpp.__version__}")
    server_env = {"MODEL_PATH": settings.model_path, "N_CTX": str(args.n_ctx), "N_GPU_LAYERS": str(args.n_gpu_layers),
                  "MAX_QUEUE": str(max(16, args.concurrency)), "LOG_LEVEL": "warning"}
    server = start([sys.executable, str(ROOT / "llmapiserver.py"), "--port", str(args.port)], server_env, args.port)
    urls = {"server": f"http://127.0.0.1:{args.port}/v1/chat/completions"}
    floor, cpp_servers = None, []
    try:
        if args.concurrency:
            llm = llama_cpp.Llama(model_path=settings.model_path, vocab_only=True, verbose=False)
            concurrent(args, ban_eog(llm), urls["server"])
        else:
            floor_port = args.port + 1
            floor = start([sys.executable, str(ROOT / "bench" / "floor_server.py"), str(floor_port),
                           json.dumps(model_args)], {}, floor_port)
            urls["floor"] = f"http://127.0.0.1:{floor_port}/v1/chat/completions"
            if args.llama_server:
                for offset, (name, fa) in enumerate((("llama-server", flash_attn), ("llama-server-default", None))):
                    cpp_port = args.port + 2 + offset
                    cpp_servers.append(start(llama_server_command(args.llama_server, settings, cpp_port, fa), {},
                                             cpp_port))
                    urls[name] = f"http://127.0.0.1:{cpp_port}/v1/chat/completions"
            llm = llama_cpp.Llama(verbose=False, **model_args)
            default_llm = llama_cpp.Llama(verbose=False, **default_args)
            single_stream(args, llm, default_llm, settings, ban_eog(llm), urls)
        server_rss = rss_mb(server.pid)
        base_rss = model_only_rss(model_args, 16)
        print(f"\nserver RSS {server_rss:.0f} MB; a bare process with the same model {base_rss:.0f} MB; "
              f"beyond the model: {server_rss - base_rss:.0f} MB")
    finally:
        for proc in (server, floor, *cpp_servers):
            if proc is not None:
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    main()
