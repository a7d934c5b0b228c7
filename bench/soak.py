"""Soak test: N concurrent clients for a fixed time against a running llmapiserver (loopback only).

    $ python bench/soak.py --duration 300 --clients 8                 # starts its own server
    $ python bench/soak.py --url http://127.0.0.1:8000 --key sk-...    # an already running one

Each client loops until the time is up, picking at random: a streaming request (a share of them
disconnect after a few chunks), a non-streaming one, or an invalid one; after a 429 it waits about
the second that Retry-After asks for. Every request has a hard
client-side timeout, so a hung server shows up as "hung", never as a hung soak. The report:
requests by outcome and status, hung requests, 5xx, streams that ended without [DONE] or an
error event (counting only clients that stayed), queue-full 429s, and server RSS at start and end.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT = 120  # seconds: past this a request counts as hung
INVALID_BODIES = [{"messages": []}, {"messages": [{"role": "robot", "content": "x"}]}, {"temperature": 9},
                  {"messages": "hi"}, {"messages": [{"role": "user", "content": "x"}], "n": 3}]


@dataclass
class Report:
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    hung: int = 0
    server_errors: int = 0
    unfinished_streams: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str, status: int | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if status is not None:
                self.statuses[status] += 1
                self.server_errors += status >= 500

    def as_dict(self) -> dict:
        return {"outcomes": dict(self.outcomes), "statuses": dict(sorted(self.statuses.items())),
                "hung": self.hung, "5xx": self.server_errors, "unfinished_streams": self.unfinished_streams,
                "requests": sum(self.statuses.values()) + self.hung}


def chat(rng: random.Random, stream: bool) -> dict:
    topic = rng.choice(["the sea", "a cat", "mountains", "bread", "rain"])
    return {"messages": [{"role": "user", "content": f"Write about {topic}."}], "max_tokens": rng.randint(4, 48),
            "temperature": rng.choice([0, 0.7]), "stream": stream}


def one_stream(client: httpx.Client, url: str, rng: random.Random, report: Report, leave: bool) -> int:
    with client.stream("POST", url, json=chat(rng, True)) as response:
        if response.status_code != 200:
            response.read()
            report.add("stream-refused", response.status_code)
            return response.status_code
        events = 0
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            if leave and events >= 3:
                report.add("stream-left", 200)  # closing the response drops the connection
                return 200
            if line == "data: [DONE]" or line.startswith('data: {"error"'):
                report.add("stream-done" if line == "data: [DONE]" else "stream-error-event", 200)
                return 200
        report.add("stream-unfinished", 200)
        with report.lock:
            report.unfinished_streams += 1
        return 200


def client_loop(base_url: str, key: str, deadline: float, seed: int, report: Report) -> None:
    rng = random.Random(seed)
    url = base_url + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(headers=headers, timeout=REQUEST_TIMEOUT) as client:
        while time.monotonic() < deadline:
            kind = rng.choices(["stream", "leave", "json", "invalid"], [4, 2, 3, 1])[0]
            try:
                if kind in ("stream", "leave"):
                    status = one_stream(client, url, rng, report, leave=kind == "leave")
                elif kind == "json":
                    status = client.post(url, json=chat(rng, False)).status_code
                    report.add("json-ok" if status == 200 else "json-refused", status)
                else:
                    status = client.post(url, json=rng.choice(INVALID_BODIES)).status_code
                    report.add("invalid", status)
                if status == 429:  # a well-behaved client waits as Retry-After asks (1 s), give or take
                    time.sleep(rng.uniform(0.5, 1.5))
            except httpx.TimeoutException:
                with report.lock:
                    report.hung += 1
            except httpx.HTTPError as exc:
                report.add(f"transport-error:{type(exc).__name__}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_soak(base_url: str, key: str, duration: float, clients: int, pid: int | None = None) -> dict:
    report = Report()
    rss_start = rss_mb(pid) if pid else None
    deadline = time.monotonic() + duration
    threads = [threading.Thread(target=client_loop, args=(base_url, key, deadline, i, report)) for i in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + REQUEST_TIMEOUT + 30)
    result = report.as_dict()
    health = httpx.get(base_url + "/health", timeout=10).status_code
    result.update(seconds=round(time.monotonic() - started, 1), clients=clients, health_after=health)
    if pid:
        result.update(rss_start_mb=round(rss_start, 1), rss_end_mb=round(rss_mb(pid), 1))
    return result


def start_server(port: int, key: str, max_queue: int) -> subprocess.Popen:
    env = {**os.environ, "API_KEYS": key, "MAX_QUEUE": str(max_queue), "N_CTX": "2048", "LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "llmapiserver.py"), "--port", str(port)], env=env)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server; default: start one on --port")
    parser.add_argument("--key", default="soak-key")
    parser.add_argument("--port", type=int, default=8941)
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=4, help="for the started server: small, to see 429s")
    args = parser.parse_args()
    proc = None if args.url else start_server(args.port, args.key, args.max_queue)
    try:
        base_url = args.url or f"http://127.0.0.1:{args.port}"
        warm = run_soak(base_url, args.key, min(10, args.duration / 6), args.clients, proc.pid if proc else None)
        result = run_soak(base_url, args.key, args.duration, args.clients, proc.pid if proc else None)
        result["warmup"] = {k: warm[k] for k in ("requests", "rss_start_mb", "rss_end_mb") if k in warm}
        print(json.dumps(result, indent=2))
    finally:
        if proc:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
