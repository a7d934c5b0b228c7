"""Decode speed of two llama-cpp-python builds on this machine, in interleaved rounds.

    $ python bench/compare_builds.py /path/native/bin/python /path/portable/bin/python --tokens 256,1024

Each python is an environment with its own llama-cpp-python build (for instance the default
`-march=native` one and the Dockerfile's `-DGGML_NATIVE=OFF`, x86-64-v3). Every round runs a bare
Llama.generate() loop in a fresh process of each, one after another (never two at once), with
llama-cpp-python's defaults but for the threads (one per physical core, as the server) and flash
attention off (the server's CPU default). Prints decode tok/s medians and the per-round ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import llmapiserver as las  # noqa: E402

LOOP = """
import json, sys, time, llama_cpp
args = json.loads(sys.argv[1])
llm = llama_cpp.Llama(model_path=args["model"], n_ctx=args["n_ctx"], n_threads=args["threads"],
                      n_threads_batch=args["threads"], flash_attn=False, verbose=False)
eog = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t)]
def ban(input_ids, scores):
    scores[eog] = -1e9
    return scores
prompt = llm.tokenize(b"Write a very long story about a lighthouse keeper and the sea.")
first = last = None
for n, _ in enumerate(llm.generate(prompt, temp=0, logits_processor=llama_cpp.LogitsProcessorList([ban])), 1):
    last = time.perf_counter()
    first = first or last
    if n >= args["tokens"]:
        break
print(json.dumps({"decode": (n - 1) / (last - first), "system_info": llama_cpp.llama_print_system_info().decode()}))
"""


def run(python: str, tokens: int, model: str, threads: int, n_ctx: int) -> dict:
    payload = json.dumps({"model": model, "tokens": tokens, "threads": threads, "n_ctx": n_ctx})
    out = subprocess.run([python, "-c", LOOP, payload], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="python of the first build (e.g. native)")
    parser.add_argument("second", help="python of the second build (e.g. portable)")
    parser.add_argument("--tokens", default="256,1024")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model, threads = las.find_bundled_model(), las.physical_cores()
    for tokens in (int(t) for t in args.tokens.split(",")):
        n_ctx = max(512, tokens + 64)
        runs: dict[str, list[dict]] = {"first": [], "second": []}
        for _ in range(args.rounds):
            runs["first"].append(run(args.first, tokens, model, threads, n_ctx))
            runs["second"].append(run(args.second, tokens, model, threads, n_ctx))
        print(f"\n## {tokens} tokens, {args.rounds} interleaved rounds, {threads} threads")
        for name in ("first", "second"):
            print(f"{name:<7} {statistics.median(r['decode'] for r in runs[name]):7.1f} tok/s   "
                  f"{runs[name][0]['system_info'][:160]}")
        ratio = statistics.median(b["decode"] / a["decode"] for a, b in zip(runs["first"], runs["second"]))
        print(f"second / first (per round, median): {ratio:.3f}")


if __name__ == "__main__":
    main()
