"""The SSE follow loop in isolation: framing, keepalives, wake-ups, completion last."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from contree_shell.sandbox.operations import OperationsDB
from contree_shell.server.sse import KEEPALIVE, event_stream


def test_frames_carry_id_event_and_one_line_json(tmp_path: Path) -> None:
    ops = OperationsDB(tmp_path / "ops.db")
    op = ops.create("instance", {"command": "x"})
    ops.append_event(op.uuid, "stdout", {"value": "a\nb", "encoding": "ascii"}, spid=1)
    ops.finish(op.uuid, "SUCCESS")

    async def collect() -> list[bytes]:
        return [f async for f in event_stream(ops, op.uuid, after=None, spid=None,
                                              follow=True)]

    frames = asyncio.run(collect())
    first = frames[0].decode()
    assert first.startswith("id: 0\nevent: stdout\ndata: {") and first.endswith("}\n\n")
    assert json.loads(first.split("data: ", 1)[1])["data"]["value"] == "a\nb"
    last = frames[-1].decode()
    assert "event: completion" in last
    assert '"spid"' not in last
    ops.close()


def test_follow_sends_keepalives_then_wakes_on_new_events(tmp_path: Path) -> None:
    ops = OperationsDB(tmp_path / "ops.db")
    op = ops.create("instance", {"command": "x"})
    got: list[bytes] = []

    async def follow() -> None:
        agen = event_stream(ops, op.uuid, after=None, spid=None, follow=True, keepalive=0.05)
        async for frame in agen:
            got.append(frame)
            if frame == KEEPALIVE and got.count(KEEPALIVE) == 2:
                # Another thread appends, as a sandbox I/O thread would.
                t = threading.Thread(target=lambda: (
                    ops.append_event(op.uuid, "stdout", {"value": "x", "encoding": "ascii"},
                                     spid=1),
                    ops.finish(op.uuid, "SUCCESS")))
                t.start()

    asyncio.run(asyncio.wait_for(follow(), 10))
    kinds = [f.split(b"\n")[1] if not f.startswith(b":") else b"keepalive" for f in got]
    assert kinds[:2] == [b"keepalive", b"keepalive"]
    data = [k for k in kinds if k != b"keepalive"]
    assert data == [b"event: stdout", b"event: completion"]
    ops.close()


def test_finish_is_first_wins_and_completion_stays_last(tmp_path: Path) -> None:
    ops = OperationsDB(tmp_path / "ops.db")
    op = ops.create("instance", {"command": "x"})
    assert ops.finish(op.uuid, "CANCELLED", error="cancelled") is True
    assert ops.finish(op.uuid, "SUCCESS") is False
    ops.update(op.uuid, status="EXECUTING")  # terminal operations never change
    assert ops.get(op.uuid).status == "CANCELLED"
    events = ops.events(op.uuid)
    assert [e.type for e in events] == ["completion"]
    assert events[0].data["status"] == "CANCELLED"
    ops.close()


def test_restart_marks_unfinished_operations_failed(tmp_path: Path) -> None:
    ops = OperationsDB(tmp_path / "ops.db")
    running = ops.create("instance", {"command": "x"}).uuid
    ops.update(running, status="EXECUTING")
    ops.append_event(running, "init", {}, spid=0)
    ops.close()
    again = OperationsDB(tmp_path / "ops.db")
    assert again.fail_unfinished() == [running]
    op = again.get(running)
    assert op.status == "FAILED" and op.error == "server restarted"
    assert [e.type for e in again.events(running)] == ["init", "completion"]
    assert isinstance(op.duration, float)
    again.close()
