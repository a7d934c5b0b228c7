"""The slot engine's KV cache: one unified cache for all sequences against one per sequence.

    $ python bench/parallel_kv.py --slots 4 --tokens 128 --rounds 3

In-process (no HTTP), on the llama thread as the server runs it: `--slots` requests of `--tokens`
greedy tokens at once, each with its own prompt, in interleaved rounds; aggregate tok/s (median)
for each layout. The server uses the per-sequence layout; this is the measurement behind it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import llmapiserver as las  # noqa: E402
from bench import machine  # noqa: E402


def run(llm: las.ServedLlama, engine: las.SlotEngine, slots: int, tokens: int, bias: dict) -> float:
    def one(i: int) -> int:
        owner = las.SlotLlama(llm, engine)
        for _ in engine.completion(owner, f"Write a long story about place number {i}.", max_tokens=tokens,
                                   temperature=0, logit_bias=bias):
            pass
        return owner.sampled_tokens

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(slots) as pool:
        total = sum(pool.map(one, range(slots)))
    return total / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-ctx", type=int, default=2048)
    args = parser.parse_args()
    settings = las.load_settings(["--n-ctx", str(args.n_ctx)])
    worker = las.llama_thread()
    llm = worker.submit(las.load_model, settings).result()
    bias = {"0": -100.0, "2": -100.0}  # SmolLM2's end-of-text tokens: every answer has --tokens tokens
    engines = {name: worker.submit(las.SlotEngine, llm, args.slots, worker, unified).result()
               for name, unified in (("per-sequence", False), ("unified", True))}
    print(machine())
    print(f"{args.slots} slots x {args.tokens} tokens, N_CTX {args.n_ctx} a slot, {settings.n_threads} threads")
    results: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            results[name].append(run(llm, engine, args.slots, args.tokens, bias))
    for name, rates in results.items():
        print(f"{name:<13} {statistics.median(rates):7.1f} tok/s  (rounds: {', '.join(f'{r:.1f}' for r in rates)})")


if __name__ == "__main__":
    main()
