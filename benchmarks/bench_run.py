"""Benchmark: the cost of one sandbox run, end to end and server-side.

Prints the median over N runs of:
  * `contree run true` as a whole process (what a user waits for at a terminal),
  * the server-side run: spawn request -> `completion` event on the SSE stream,
  * a baseline measured in the same run: a bare `python -c pass` process start,
    so the figures can be compared across machines as ratios.

Usage: python benchmarks/bench_run.py [-n 20]   (as root; starts its own server)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import import_busybox, start_server, stop_server  # noqa: E402


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:8.1f} ms"


def server_side_run(http, image: str, command: str) -> float:
    """Seconds from the spawn request to the `completion` event of its stream."""
    start = time.perf_counter()
    resp = http.post(
        "/v1/instances",
        json={"image": image, "command": command, "shell": True, "timeout": 60},
    )
    op = resp.json()["uuid"]
    with http.stream("GET", f"/v1/operations/{op}/events", params={"follow": 1}) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: completion"):
                break
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="runs per figure (default 20)")
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="contree-bench-") as tmp:
        server = start_server(Path(tmp))
        try:
            image = import_busybox(server)
            env = server.session_env()
            server.contree("use", image, env=env)

            baseline = []
            for _ in range(opts.n):
                t = time.perf_counter()
                subprocess.run([sys.executable, "-c", "pass"], check=True)
                baseline.append(time.perf_counter() - t)

            whole = []
            for _ in range(opts.n):
                t = time.perf_counter()
                result = server.contree("run", "--", "true", env=env)
                whole.append(time.perf_counter() - t)
                assert result.returncode == 0, result.stderr

            with server.http() as http:
                server_side_run(http, image, "true")  # warm the page cache
                side = [server_side_run(http, image, "true") for _ in range(opts.n)]
                write = [
                    server_side_run(http, image, f"echo {i} > /bench-{i}") for i in range(opts.n)
                ]
        finally:
            stop_server(server)

    base = statistics.median(baseline)
    print(f"runs per figure: {opts.n}")
    print(f"baseline  python -c pass process        {_ms(baseline)}")
    print(f"contree run true (whole process)        {_ms(whole)}  "
          f"ratio to baseline {statistics.median(whole) / base:5.2f}")
    print(f"server-side run of true (spawn->completion) {_ms(side)}")
    print(f"server-side run writing one file + commit   {_ms(write)}")
    print(json.dumps({
        "baseline_ms": base * 1000,
        "cli_run_true_ms": statistics.median(whole) * 1000,
        "server_run_true_ms": statistics.median(side) * 1000,
        "server_run_write_ms": statistics.median(write) * 1000,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
