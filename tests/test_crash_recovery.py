"""Crash safety: SIGKILL the server mid-run (mid-commit / mid-write), then restart it.

A real server (own home, `--pids 200` so every run gets a cgroup) runs four `sleep 100`
and one run that writes 50 MB and exits. The server is started with
CONTREE_TEST_FREEZE_AT=commit:renamed@2, so the writer's commit stops right after its
layer was renamed into the store (before the image row exists); the test SIGKILLs the
server exactly then. A second case kills as soon as the writer runs (mid-write). Afterwards nothing of the runs may be left on the host (processes,
mounts, cgroups), and the restarted server must show every operation terminal with a
reason and a final `completion` event, an empty runs dir, no orphan layer, and every
image readable through the inspect API.

Waiting is done on the API's event streams, pidfds and the freeze marker; the only
polls are bounded ones for filesystem facts that have nothing to await on.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.test_server_support import (
    TERMINAL,
    ApiServer,
    import_busybox,
    run,
    spawn,
    sse_events,
    start_api_server,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox engine needs root")

WRITE = "head -c 50000000 /dev/zero > /big; echo done"
WRITE_SLOW = "head -c 50000000 /dev/urandom > /big; echo done"


def _children() -> dict[int, list[int]]:
    """ppid -> pids, for every process on the host."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> list[int]:
    tree = _children()
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _state(pid: int) -> str:
    """The state letter of `pid` ("" if gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _pids_cgroup(pid: int) -> str | None:
    """The v1 `pids` cgroup path of `pid` (or its cgroup2 path), None if gone."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    v2 = None
    for line in text.splitlines():
        _hid, ctrls, path = line.split(":", 2)
        if "pids" in ctrls.split(","):
            return f"/sys/fs/cgroup/pids{path}"
        if ctrls == "":
            v2 = path
    return None if v2 is None else f"/sys/fs/cgroup/unified{v2}"


def _wait_until(predicate: object, what: str, timeout: float = 60.0) -> None:
    """Bounded poll for a filesystem fact (nothing to await on)."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _wait_spawned(http: httpx.Client, op: str) -> None:
    """Follow the run's events until `spawn`: the command runs (status EXECUTING)."""
    for ev in sse_events(http, op):
        assert ev["type"] != "completion", f"{op} ended early: {ev}"
        if ev["type"] == "spawn":
            break
    assert http.get(f"/v1/operations/{op}").json()["status"] == "EXECUTING"


def _wait_stdout(http: httpx.Client, op: str, text: str) -> None:
    seen = ""
    for ev in sse_events(http, op):
        assert ev["type"] != "completion", f"{op} ended before printing {text!r}: {ev}"
        if ev["type"] == "stdout":
            seen += str(ev.get("data", {}).get("value", ev.get("value", "")))
            if text in seen:
                return


def _layers_in_db(home: Path) -> set[str]:
    db = home / "store" / "images.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT layers FROM images").fetchall()
    return {lid for (layers,) in rows for lid in json.loads(layers)}


def _store_mounts(home: Path) -> list[str]:
    store = str(home / "store")
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if store in line]


def _kill_and_reap(srv: ApiServer) -> None:
    assert srv.process is not None
    os.kill(srv.process.pid, signal.SIGKILL)
    srv.process.wait(timeout=30)
    assert srv.process.returncode == -signal.SIGKILL
    srv.process = None


@pytest.mark.parametrize("moment", ["mid-commit", "mid-write"])
def test_sigkill_mid_run_leaves_nothing_and_restart_recovers(tmp_path: Path, moment: str) -> None:
    """mid-commit: the writer's commit is frozen after its layer rename (deterministic).
    mid-write: the kill comes as soon as the writer runs (50 MB from /dev/urandom)."""
    env = {"CONTREE_DEFAULT_NETWORKING": "0"}
    if moment == "mid-commit":
        # The 2nd commit that renames a layer (the 1st is the child image below) freezes.
        env["CONTREE_TEST_FREEZE_AT"] = "commit:renamed@2"
    srv = start_api_server(tmp_path, "--pids", "200", env=env)
    home = srv.home
    cgroups: set[str] = set()
    try:
        with srv.http() as http:
            busybox = import_busybox(http)
            # A committed child image too, so the restart has more than one to read.
            child = run(http, busybox, "echo kept > /kept", timeout=60)
            assert child["status"] == "SUCCESS", child
            sleeps = [spawn(http, busybox, "sleep 100", timeout=600) for _ in range(4)]
            writer = spawn(http, busybox, WRITE if moment == "mid-commit" else WRITE_SLOW,
                           timeout=600)
            for op in sleeps:
                _wait_spawned(http, op)
            if moment == "mid-commit":
                _wait_stdout(http, writer, "done")
            else:
                _wait_spawned(http, writer)
        orphan: set[str] = set()
        if moment == "mid-commit":
            # The writer's commit reaches the freeze point: layer renamed, no image row.
            _wait_until(lambda: (home / "frozen-at").exists(), "the writer's commit")
            assert (home / "frozen-at").read_text().strip() == "commit:renamed"
            orphan = {p.name for p in (home / "store" / "layers").iterdir()}
            orphan -= _layers_in_db(home)
            assert len(orphan) == 1, orphan  # the half-committed layer
        assert srv.process is not None
        server_pid = srv.process.pid

        # Everything the server runs: the launcher, and contree-init + command per run.
        procs = _descendants(server_pid)
        sleepers = [p for p in procs if _cmdline(p) == ["sleep", "100"]]
        inits = [p for p in procs if _comm(p) == "contree-init"]
        assert len(sleepers) == 4, [(p, _cmdline(p)) for p in procs]
        assert len(inits) == (4 if moment == "mid-commit" else 5), [(p, _comm(p)) for p in procs]
        sleeper_cgroups = {_pids_cgroup(p) for p in sleepers}
        assert all(c and "/contree-" in c for c in sleeper_cgroups), sleeper_cgroups
        assert len(sleeper_cgroups) == 4
        # Every live run's cgroup (the writer's too when it still runs).
        cgroups |= {c for p in procs if (c := _pids_cgroup(p)) and "/contree-" in c}
        assert len(cgroups) == len(inits) and sleeper_cgroups <= cgroups, cgroups
        recorded = {
            line
            for f in (home / "store" / "runs").glob("*/cgroups")
            for line in f.read_text().splitlines()
        }
        assert cgroups <= recorded, (cgroups, recorded)
        pidfds = {p: os.pidfd_open(p) for p in procs}

        _kill_and_reap(srv)

        # Every process of the runs dies with the server (PDEATHSIG), awaited by pidfd.
        try:
            deadline = time.monotonic() + 30
            waiting = dict(pidfds)
            while waiting:
                left = deadline - time.monotonic()
                assert left > 0, f"still alive after the kill: {list(waiting)}"
                ready, _, _ = select.select(list(waiting.values()), [], [], left)
                waiting = {p: fd for p, fd in waiting.items() if fd not in ready}
        finally:
            for fd in pidfds.values():
                os.close(fd)
        for pid in os.listdir("/proc"):
            if pid.isdigit() and _cmdline(int(pid)) == ["sleep", "100"]:
                assert _pids_cgroup(int(pid)) not in cgroups, f"sleep 100 of a run: {pid}"
        # Exited (a pidfd is readable at exit): at most a zombie until init reaps it.
        assert not [p for p in procs if _state(p) not in ("", "Z", "X")]
        # Overlays live in the runs' own mount namespaces: never on the host.
        assert _store_mounts(home) == []
        # The kernel keeps an empty cgroup until someone removes it: no process is left
        # in any run cgroup now; the restarted server removes the directories.
        for cg in cgroups:
            assert cg is not None
            procs_file = Path(cg) / "cgroup.procs"
            assert procs_file.read_text().strip() == "", cg

        srv.extra_env = {"CONTREE_DEFAULT_NETWORKING": "0"}  # no freeze this time
        srv.start()
        for cg in cgroups:
            assert cg is not None and not Path(cg).exists(), f"run cgroup left: {cg}"
        assert list((home / "store" / "runs").iterdir()) == []
        layers_on_disk = {p.name for p in (home / "store" / "layers").iterdir()}
        assert layers_on_disk <= _layers_in_db(home), layers_on_disk - _layers_in_db(home)
        assert not (orphan & layers_on_disk)
        assert _store_mounts(home) == []

        with srv.http() as http:
            listed = http.get("/v1/operations", params={"limit": 1000}).json()
            uuids = {op["uuid"] for op in listed}
            assert {*sleeps, writer, child["uuid"]} <= uuids
            for op_uuid in uuids:
                op = http.get(f"/v1/operations/{op_uuid}").json()
                assert op["status"] in TERMINAL, op
                if op_uuid in sleeps or (op_uuid == writer and moment == "mid-commit"):
                    assert op["status"] == "FAILED", op
                if op["status"] != "SUCCESS":
                    assert op["error"], op
                events = list(sse_events(http, op_uuid, follow=False))
                assert events and events[-1]["type"] == "completion", (op_uuid, events[-3:])
            images = http.get("/v1/images", params={"limit": 1000}).json()["images"]
            assert {busybox, child["result"]["image"]} <= {img["uuid"] for img in images}
            writer_op = http.get(f"/v1/operations/{writer}").json()
            # The frozen commit made no image; a mid-write kill neither, unless the
            # writer (improbably) finished and committed before the kill landed.
            assert len(images) == (3 if writer_op["status"] == "SUCCESS" else 2), images
            for img in images:
                root = http.get(f"/v1/inspect/{img['uuid']}/list", params={"path": "/"})
                assert root.status_code == 200, root.text
                assert {"bin", "etc"} <= {f["path"] for f in root.json()["files"]}
                got = http.get(f"/v1/inspect/{img['uuid']}/download",
                               params={"path": "/bin/busybox"})
                assert got.status_code == 200 and got.content[:4] == b"\x7fELF"
            # And the restarted server runs again from both images.
            again = run(http, child["result"]["image"], "cat /kept", timeout=60)
            assert again["status"] == "SUCCESS", again
    finally:
        if srv.process is not None:
            srv.stop()
        for cg in cgroups:  # a failure before the restart must not leak run cgroups
            with contextlib.suppress(OSError):
                Path(cg).rmdir()


def test_abandoned_run_cgroups_are_removed_only_when_empty_and_old() -> None:
    """The start-up backstop for cgroups no run dir recorded, on a private real parent."""
    import secrets
    import subprocess

    from contree_shell.sandbox.cgroups import RunCgroup
    from contree_shell.sandbox.instances import remove_abandoned_cgroups

    root = Path("/sys/fs/cgroup/pids")
    if not (root / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids hierarchy here")
    parent = root / f"ctest-{secrets.token_hex(6)}"
    parent.mkdir()
    empty, busy = parent / "contree-empty", parent / "contree-busy"
    other = parent / "not-a-run"
    sleeper = None
    try:
        for d in (empty, busy, other):
            d.mkdir()
        sleeper = subprocess.Popen(["sleep", "100"])
        (busy / "cgroup.procs").write_text(f"{sleeper.pid}\n")
        # Young: nothing goes (a run may have just created its group).
        assert remove_abandoned_cgroups(parents=[parent]) == 0
        assert empty.exists()
        # Old enough: only the empty run group goes.
        assert remove_abandoned_cgroups(min_age=0, parents=[parent]) == 1
        assert not empty.exists() and busy.exists() and other.exists()
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        # RunCgroup.remove retries while a dead task still holds a group (EBUSY).
        RunCgroup({str(i): d for i, d in enumerate((empty, busy, other))}, None).remove()
        RunCgroup({"parent": parent}, None).remove()
    assert not parent.exists()
