"""Does a deep history stay as fast as a fresh image? (background squash at work)

Run as root: ``python benchmarks/bench_depth.py [depth] [runs]`` (defaults 1000 and 50).

1. Import a busybox base image into a scratch store and start the background squasher.
2. Build a chain of ``depth`` committed images with the real runtime: each run writes
   one small file and is committed on top of the previous image.
3. Wait for the squasher, then time ``runs`` runs of ``/bin/true`` (Sandbox.start to
   exit) at depth 1 (the base image) and at full depth, interleaved so both see the
   same machine state. Prints medians, their ratio (target <= 1.25) and squash costs.
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
from contree_shell.sandbox.runtime import RunSpec, Sandbox
from contree_shell.sandbox.store import Store

ENV = {"PATH": "/bin"}


def run_once(store: Store, image: str, argv: list[str]) -> tuple[float, str]:
    """One run over ``image``; returns (start->exit seconds, committed image)."""
    run = store.new_run(image)
    t0 = time.perf_counter()
    sb = Sandbox.start(lowers=list(run.layers), upper=run.upper, work=run.work,
                       spec=RunSpec(argv=argv, env=ENV),
                       on_output=lambda stream, chunk: None)  # fmt: skip
    info = sb.wait()
    elapsed = time.perf_counter() - t0
    if info is None or info.exit_code != 0:
        store.discard(run)
        raise RuntimeError(f"run {argv} failed: {info}")
    result = store.commit(image, run, operation_uuid=None)
    return elapsed, result.image


def main() -> int:
    if os.geteuid() != 0:
        sys.stderr.write("run as root: the sandbox engine needs it\n")
        return 1
    depth = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    tmp = Path(tempfile.mkdtemp(prefix="bench-depth-"))
    try:
        store = Store(tmp / "store")
        rootfs = store.make_tmp("rootfs")
        build_busybox_rootfs(rootfs)
        base = store.add_rootfs(rootfs, tag=None)
        store.start_background_squash()

        t0 = time.perf_counter()
        image = base
        for i in range(1, depth + 1):
            _, image = run_once(store, image, ["/bin/sh", "-c", f"echo {i} > /root/f{i}"])
        build = time.perf_counter() - t0
        t1 = time.perf_counter()
        store.wait_for_squash()
        drain = time.perf_counter() - t1
        tip = image
        tip_layers = len(store.get(tip).layers)
        assert store.view(tip).read(f"/root/f{depth}") == f"{depth}\n".encode()

        for _ in range(3):  # warm caches: the first run after an import is cold
            run_once(store, base, ["/bin/true"])
            run_once(store, tip, ["/bin/true"])
        shallow: list[float] = []
        deep: list[float] = []
        for _ in range(runs):
            t, same = run_once(store, base, ["/bin/true"])
            assert same == base
            shallow.append(t)
            t, same = run_once(store, tip, ["/bin/true"])
            assert same == tip
            deep.append(t)

        built = [e for e in store.squash_log if e.built]
        reused = [e for e in store.squash_log if not e.built]
        s, d = statistics.median(shallow), statistics.median(deep)
        print(
            f"chain: {depth} committed images in {build:.1f} s "
            f"({depth / build:.0f} runs+commits/s, squasher drained {drain:.2f} s after)"
        )
        print(
            f"squash threshold {store.squash_threshold}, keep {store.squash_keep}: "
            f"{len(built)} flattened layers built, {len(reused)} reused"
        )
        if built:
            secs = [e.seconds for e in built]
            print(
                f"squash build time: total {sum(secs):.2f} s, median "
                f"{statistics.median(secs) * 1000:.1f} ms, max {max(secs) * 1000:.1f} ms "
                f"({built[-1].entries} entries, {built[-1].bytes / 1e6:.1f} MB in the last)"
            )
        if reused:
            print(
                f"squash reuse time: median "
                f"{statistics.median(e.seconds for e in reused) * 1000:.2f} ms"
            )
        print(f"layers mounted: depth 1 -> 1, depth {depth} -> {tip_layers}")
        print(f"true at depth 1:     median {s * 1000:.2f} ms over {runs} runs")
        print(f"true at depth {depth}: median {d * 1000:.2f} ms over {runs} runs")
        print(f"ratio deep/shallow: {d / s:.2f} (target <= 1.25)")
        store.close()
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
