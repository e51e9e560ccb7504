"""Cost of one sandbox run of `true` (start → exit) against a plain fork+exec baseline.

Run as root: ``python benchmarks/bench_runtime.py [runs]``. Both numbers are measured in
the same process, in the same run, so the ratio is comparable across machines.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from contree_shell.sandbox.bootstrap import build_busybox_rootfs
from contree_shell.sandbox.runtime import NETWORK_SUPPORTED, RunSpec, Sandbox


def fork_exec_true(true_path: str) -> float:
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(true_path, [true_path])
        finally:
            os._exit(127)
    os.waitpid(pid, 0)
    return time.perf_counter() - t0


def sandbox_true(image: Path, scratch: Path, i: int, network: bool = False) -> float:
    run = scratch / f"run{i}"
    upper, work = run / "upper", run / "work"
    upper.mkdir(parents=True)
    work.mkdir()
    spec = RunSpec(argv=["true"], env={"PATH": "/bin"}, network=network)
    t0 = time.perf_counter()
    sb = Sandbox.start(lowers=[image], upper=upper, work=work, spec=spec,
                       on_output=lambda stream, chunk: None)  # fmt: skip
    info = sb.wait()
    elapsed = time.perf_counter() - t0
    assert info is not None and info.exit_code == 0, info
    assert not any(upper.iterdir()), "a run of true must leave upper empty"
    shutil.rmtree(run)
    return elapsed


def main() -> int:
    if os.geteuid() != 0:
        sys.stderr.write("run as root: the sandbox engine needs it\n")
        return 1
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    true_path = shutil.which("true") or "/bin/true"
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp:
        image = Path(tmp) / "image"
        build_busybox_rootfs(image)
        scratch = Path(tmp) / "runs"
        scratch.mkdir()
        for i in range(3):  # warm caches (first run after an import is cold)
            sandbox_true(image, scratch, -1 - i)
            fork_exec_true(true_path)
        base = [fork_exec_true(true_path) for _ in range(runs)]
        sand = [sandbox_true(image, scratch, i) for i in range(runs)]
        net: list[float] = []
        net_mixed: list[float] = []
        if NETWORK_SUPPORTED:
            # Back to back: the namespace pool drains, most runs attach slirp4netns themselves.
            net = [sandbox_true(image, scratch, runs + i, network=True) for i in range(10)]
            # Interleaved with offline runs: the pool refills in between (interactive use).
            for i in range(10):
                sandbox_true(image, scratch, runs + 100 + i)
                net_mixed.append(sandbox_true(image, scratch, runs + 200 + i, network=True))
    b, s = statistics.median(base), statistics.median(sand)
    print(f"runs: {runs}")
    print(f"fork+exec true (baseline): median {b * 1000:.2f} ms")
    print(f"sandbox true (start->exit): median {s * 1000:.2f} ms "
          f"(p90 {statistics.quantiles(sand, n=10)[-1] * 1000:.2f} ms)")  # fmt: skip
    print(f"ratio sandbox/baseline: {s / b:.1f}x")
    if net:
        print(f"sandbox true with network=True (slirp4netns), 10 runs back to back: median "
              f"{statistics.median(net) * 1000:.2f} ms; 10 runs between offline runs: "
              f"median {statistics.median(net_mixed) * 1000:.2f} ms")  # fmt: skip
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
