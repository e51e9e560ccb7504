"""Benchmark: server-side figures of the local engine (prints figures and ratios only).

Starts its own server (tests/conftest.py's start_server, as bench_run.py does) and
measures, all server-side (spawn request -> `completion` event on the SSE stream):

  a. a run of `true` at depth 1, then again on top of a chain of 1,000 committed images
     (built through the API, each run writing one small file; after the background
     squash settles), and the ratio depth-1000 / depth-1 (target <= 1.25), from runs at
     both depths interleaved after the chain is built;
  b. a run that writes one file and commits;
  c. throughput: 8 client threads (each its own httpx client on the unix socket) running
     `true` for 30 s with networking off, then a shorter phase with networking on;
     completions and errors are counted (target >= 100 runs/s, zero errors);
  d. inspect: listing /usr/bin (else /bin) and reading a 1 MB file through the API;
  e. the cost of networking for one run (median with vs without).

Runs are offline unless a figure says otherwise. The load average is printed with the
figures: the numbers only mean something next to it.

Usage: python benchmarks/bench_server.py [-n 50] [--chain 1000] [--seconds 30]   (root)
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import import_busybox, start_server, stop_server  # noqa: E402

OFF = {"enabled": False}
ON = {"enabled": True}


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f} ms"


def client(sock: Path) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://contree", timeout=120
    )


def run_once(
    http: httpx.Client, image: str, command: str, network: dict[str, bool] = OFF
) -> tuple[float, dict[str, Any]]:
    """(seconds from the spawn request to the `completion` event, the final operation)."""
    start = time.perf_counter()
    resp = http.post(
        "/v1/instances",
        json={"image": image, "command": command, "shell": True, "timeout": 120,
              "networking": network},
    )
    if resp.status_code != 201:
        raise RuntimeError(f"spawn failed: {resp.status_code} {resp.text}")
    op = resp.json()["uuid"]
    with http.stream("GET", f"/v1/operations/{op}/events", params={"follow": 1}) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: completion"):
                break
    elapsed = time.perf_counter() - start
    body: dict[str, Any] = http.get(f"/v1/operations/{op}").json()
    return elapsed, body


def median_of(n: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(n))


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def build_chain(http: httpx.Client, base: str, depth: int) -> str:
    image = base
    for i in range(depth):
        _, op = run_once(http, image, f"echo {i} > /chain-{i}")
        if op["status"] != "SUCCESS":
            raise RuntimeError(f"chain run {i} failed: {op}")
        image = str(op["result"]["image"])
    return image


def settle(http: httpx.Client, image: str, n: int, bound: float) -> tuple[float, int, float]:
    """Median of `true` on `image`, repeated until two consecutive medians agree within
    5% or `bound` seconds pass. (median, rounds, seconds waited)."""
    t0 = time.monotonic()
    last = median_of(n, lambda: run_once(http, image, "true")[0])
    rounds = 1
    while time.monotonic() - t0 < bound:
        cur = median_of(n, lambda: run_once(http, image, "true")[0])
        rounds += 1
        if abs(cur - last) <= 0.05 * max(cur, last):
            return cur, rounds, time.monotonic() - t0
        last = cur
    return last, rounds, time.monotonic() - t0


def _exit_code(op: dict[str, Any]) -> int | None:
    result = (op.get("metadata") or {}).get("result") or {}
    code = (result.get("state") or {}).get("exit_code")
    return None if code is None else int(code)


def throughput(
    sock: Path, image: str, threads: int, seconds: float, network: dict[str, bool]
) -> tuple[int, int, float, list[str]]:
    """(completions, errors, elapsed, first few error texts) of `threads` clients."""
    stop = time.monotonic() + seconds
    done = [0] * threads
    errors = [0] * threads
    texts: list[str] = []

    def worker(k: int) -> None:
        with client(sock) as http:
            while time.monotonic() < stop:
                try:
                    _, op = run_once(http, image, "true", network)
                    if op["status"] == "SUCCESS" and _exit_code(op) == 0:
                        done[k] += 1
                    else:
                        errors[k] += 1
                        if len(texts) < 3:
                            texts.append(json.dumps(op)[:300])
                except Exception as exc:  # counted, the run goes on
                    errors[k] += 1
                    if len(texts) < 3:
                        texts.append(repr(exc)[:300])

    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(done), sum(errors), time.perf_counter() - t0, texts


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", type=int, default=50, help="runs per median (default 50)")
    parser.add_argument("--chain", type=int, default=1000, help="chain depth (default 1000)")
    parser.add_argument("--seconds", type=float, default=30, help="throughput phase (30)")
    parser.add_argument("--threads", type=int, default=8, help="concurrent clients (8)")
    opts = parser.parse_args()
    n = opts.n
    figures: dict[str, Any] = {}

    print(f"start: {_load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="contree-bench-server-") as tmp:
        server = start_server(Path(tmp))
        try:
            image = import_busybox(server)
            sock = server.socket
            with client(sock) as http:
                # (a) depth 1
                for _ in range(5):
                    run_once(http, image, "true")  # warm caches and the network pool
                d1 = median_of(n, lambda: run_once(http, image, "true")[0])
                figures["true_depth1_ms"] = d1 * 1000
                print(f"a. run `true`, depth 1 (median of {n})        {_ms(d1)}   {_load()}",
                      flush=True)
                t = time.perf_counter()
                top = build_chain(http, image, opts.chain)
                built = time.perf_counter() - t
                print(f"   built a chain of {opts.chain} images in {built:.1f} s "
                      f"({built / opts.chain * 1000:.1f} ms per run+commit)", flush=True)
                _, rounds, waited = settle(http, top, n, bound=120)
                depth = layer_count(server.home, top)
                # Interleaved, so both depths see the same machine state (a store with
                # thousands of images, a warm or cold page cache) and the ratio is fair.
                base_times: list[float] = []
                deep_times: list[float] = []
                for _ in range(n):
                    base_times.append(run_once(http, image, "true")[0])
                    deep_times.append(run_once(http, top, "true")[0])
                d1_now = statistics.median(base_times)
                dn = statistics.median(deep_times)
                figures["true_depth_chain_ms"] = dn * 1000
                figures["depth_ratio"] = dn / d1_now
                print(f"   run `true`, depth {opts.chain} (median of {n}, settled after "
                      f"{rounds} rounds / {waited:.1f} s; image has {depth} layers)"
                      f"  {_ms(dn)}   {_load()}")
                print(f"   run `true`, depth 1, interleaved with it (median of {n})"
                      f"  {_ms(d1_now)}")
                print(f"   ratio depth {opts.chain} / depth 1: {dn / d1_now:.3f}  (target <= 1.25)",
                      flush=True)

                # (b) write one file + commit
                counter = iter(range(10**9))
                wr = median_of(n, lambda: run_once(
                    http, image, f"echo {next(counter)} > /bench-file")[0])
                figures["write_commit_ms"] = wr * 1000
                print(f"b. run writing one file + commit (median of {n}) {_ms(wr)}   "
                      f"ratio to `true` {wr / d1:.2f}", flush=True)

                # (e) network on vs off
                for _ in range(3):
                    run_once(http, image, "true", ON)
                on = median_of(n, lambda: run_once(http, image, "true", ON)[0])
                off = median_of(n, lambda: run_once(http, image, "true", OFF)[0])
                figures.update(net_on_ms=on * 1000, net_off_ms=off * 1000)
                print(f"e. run `true` networking on  (median of {n})   {_ms(on)}")
                print(f"   run `true` networking off (median of {n})   {_ms(off)}   "
                      f"network costs {(on - off) * 1000:+.2f} ms ({on / off:.2f}x)   {_load()}",
                      flush=True)

                # (d) inspect
                listing = "/usr/bin"
                if http.get(f"/v1/inspect/{image}/list",
                            params={"path": listing}).status_code != 200:
                    listing = "/bin"
                entries = len(http.get(f"/v1/inspect/{image}/list",
                                       params={"path": listing}).json()["files"])
                ls = median_of(n, lambda: timed(lambda: http.get(
                    f"/v1/inspect/{image}/list", params={"path": listing}).raise_for_status()))
                _, op = run_once(http, image, "head -c 1048576 /dev/urandom > /onemb")
                big = str(op["result"]["image"])
                size = len(http.get(f"/v1/inspect/{big}/download",
                                    params={"path": "/onemb"}).content)
                rd = median_of(n, lambda: timed(lambda: http.get(
                    f"/v1/inspect/{big}/download", params={"path": "/onemb"}).raise_for_status()))
                figures.update(list_ms=ls * 1000, read_1mb_ms=rd * 1000)
                print(f"d. inspect list {listing} ({entries} entries, median of {n})  {_ms(ls)}")
                print(f"   inspect read a {size}-byte file (median of {n})  {_ms(rd)}   "
                      f"{size / rd / 1e6:.0f} MB/s", flush=True)

            # (c) throughput
            done, errs, took, texts = throughput(sock, image, opts.threads, opts.seconds, OFF)
            rate = done / took
            figures.update(throughput_off_runs_s=rate, throughput_off_errors=errs)
            print(f"c. throughput, {opts.threads} clients, networking off, {took:.1f} s: "
                  f"{done} runs, {errs} errors, {rate:.1f} runs/s (target >= 100, 0 errors)"
                  f"   {_load()}", flush=True)
            for text in texts:
                print(f"   error: {text}")
            short = max(5.0, opts.seconds / 3)
            done, errs, took, texts = throughput(sock, image, opts.threads, short, ON)
            rate_on = done / took
            figures.update(throughput_on_runs_s=rate_on, throughput_on_errors=errs)
            print(f"   throughput, {opts.threads} clients, networking on, {took:.1f} s: "
                  f"{done} runs, {errs} errors, {rate_on:.1f} runs/s   {_load()}", flush=True)
            for text in texts:
                print(f"   error: {text}")
        finally:
            stop_server(server)
    print(f"end: {_load()}")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                      for k, v in figures.items()}))
    return 0


def layer_count(home: Path, image: str) -> int:
    """How many layers the store mounts for `image` (images.db, read-only)."""
    db = home / "store" / "images.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT layers FROM images WHERE uuid = ?", (image,)).fetchone()
    return len(json.loads(row[0])) if row else -1


if __name__ == "__main__":
    raise SystemExit(main())
