"""Engine-level figures: runs through the store and the runtime, no server, no HTTP.

Run as root: ``python benchmarks/bench_engine.py [--quick]``. Prints figures and ratios
(no assertions); ``--quick`` shortens the throughput phase to 5 s. The machine's load
average is printed first: on a shared machine every figure is noisy.

1. ``true`` at depth 1: Store.new_run → Sandbox.start → exit → Store.commit (unchanged),
   median of 50, next to a plain fork+exec of ``true``.
2. A run that writes one file and commits a new image, median of 50.
3. Throughput: 8 client threads calling the engine (``true`` + commit) for 30 s.
4. Inspect: ImageView listing of /usr/bin and reading a 1 MB file, median of 50.
5. The cost of the network for one run (slirp4netns), median of 20 with vs without.

The depth ratio (a run at depth 1000 vs depth 1) is benchmarks/bench_depth.py's.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from contree_shell.sandbox.bootstrap import build_busybox_rootfs
from contree_shell.sandbox.inspect import ImageView
from contree_shell.sandbox.runtime import NETWORK_SUPPORTED, RunSpec, Sandbox
from contree_shell.sandbox.store import Store

ENV = {"PATH": "/bin:/usr/bin"}


def engine_run(store: Store, image: str, argv: list[str], *, network: bool = False
               ) -> tuple[float, str]:  # fmt: skip
    """One run over ``image`` committed on top of it; (start→commit seconds, image)."""
    t0 = time.perf_counter()
    run = store.new_run(image)
    sb = Sandbox.start(lowers=list(run.layers), upper=run.upper, work=run.work,
                       spec=RunSpec(argv=argv, env=ENV, network=network),
                       on_output=lambda stream, chunk: None)  # fmt: skip
    info = sb.wait()
    if info is None or info.exit_code != 0 or info.error:
        store.discard(run)
        raise RuntimeError(f"run {argv} failed: {info}")
    result = store.commit(image, run, operation_uuid=None)
    return time.perf_counter() - t0, result.image


def fork_exec(path: str) -> float:
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(path, [path])
        finally:
            os._exit(127)
    os.waitpid(pid, 0)
    return time.perf_counter() - t0


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def throughput(store: Store, image: str, clients: int, seconds: float) -> tuple[int, int]:
    """(runs, errors) of ``clients`` threads running ``true`` for ``seconds``."""
    stop = time.monotonic() + seconds
    counts = [0] * clients
    errors = [0] * clients

    def client(i: int) -> None:
        while time.monotonic() < stop:
            try:
                engine_run(store, image, ["true"])
                counts[i] += 1
            except Exception:
                errors[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), sum(errors)


def main() -> int:
    if os.geteuid() != 0:
        sys.stderr.write("run as root: the sandbox engine needs it\n")
        return 1
    quick = "--quick" in sys.argv
    load = os.getloadavg()
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cpus")
    tmp = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    try:
        store = Store(tmp / "store")
        rootfs = store.make_tmp("rootfs")
        build_busybox_rootfs(rootfs)
        base = store.add_rootfs(rootfs, tag=None)
        true_path = shutil.which("true") or "/bin/true"
        for _ in range(5):  # warm-up: the first runs after an import are cold
            engine_run(store, base, ["true"])

        base_times = [fork_exec(true_path) for _ in range(50)]
        true_times = [engine_run(store, base, ["true"])[0] for _ in range(50)]
        b, t = statistics.median(base_times), statistics.median(true_times)
        print(f"1. true, depth 1 (new_run→start→exit→commit): median {ms(t)} "
              f"(p90 {ms(statistics.quantiles(true_times, n=10)[-1])}); "
              f"fork+exec true {ms(b)}; ratio {t / b:.1f}x")  # fmt: skip

        write_times = []
        for i in range(50):
            elapsed, new = engine_run(store, base, ["sh", "-c", f"echo {i} > /file"])
            assert new != base
            write_times.append(elapsed)
        w = statistics.median(write_times)
        print(f"2. write one file + commit a new image: median {ms(w)} "
              f"(ratio to true {w / t:.2f}x)")  # fmt: skip

        seconds = 5.0 if quick else 30.0
        runs, errors = throughput(store, base, 8, seconds)
        print(f"3. throughput, 8 client threads for {seconds:.0f} s: {runs / seconds:.1f} "
              f"runs/s ({runs} runs, {errors} errors; target >= 100 runs/s on 2 cores)")  # fmt: skip

        _, big = engine_run(store, base, ["sh", "-c",
                                          "dd if=/dev/urandom of=/big bs=1M count=1 2>/dev/null"])  # fmt: skip
        view = ImageView(store.layer_paths(big))
        list_times, read_times = [], []
        entries = 0
        for _ in range(50):
            t0 = time.perf_counter()
            _, listed = view.listdir("/usr/bin")
            list_times.append(time.perf_counter() - t0)
            entries = len(listed)
            t0 = time.perf_counter()
            data = view.read("/big")
            read_times.append(time.perf_counter() - t0)
            assert len(data) == 1 << 20
        print(f"4. inspect: listdir /usr/bin ({entries} entries) median "
              f"{ms(statistics.median(list_times))}; read a 1 MB file median "
              f"{ms(statistics.median(read_times))}")  # fmt: skip

        if NETWORK_SUPPORTED:
            off, on = [], []
            for _ in range(20):  # interleaved, so both see the same machine state
                off.append(engine_run(store, base, ["true"])[0])
                on.append(engine_run(store, base, ["true"], network=True)[0])
            mo, mn = statistics.median(off), statistics.median(on)
            print(f"5. network for one run: true with network {ms(mn)} vs without "
                  f"{ms(mo)}: +{ms(mn - mo)} ({mn / mo:.1f}x)")  # fmt: skip
        else:
            print("5. network: slirp4netns is not usable, skipped")
        load = os.getloadavg()
        print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print("depth ratio (depth 1000 vs 1): see benchmarks/bench_depth.py")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
