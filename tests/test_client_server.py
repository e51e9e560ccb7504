"""The client against a real local server (the shared `server` fixture), nothing mocked."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contree_shell.client.api import ContreeClient
from contree_shell.client.errors import NotFound, ServerStartError, Unprocessable
from contree_shell.client.local import ensure_local_server, socket_answers
from contree_shell.client.runner import RunOutcome, run_operation
from contree_shell.client.stdin import PipeStdin, TtyLineStdin
from contree_shell.config import Profile


@pytest.fixture(scope="module")
def live(server: Any) -> Any:
    """The shared real server."""
    return server


@pytest.fixture
def client(live: Any) -> Iterator[ContreeClient]:
    profile = Profile(name="local", url=live.url, type="local")
    with ContreeClient(profile, timeout=60.0) as api:
        yield api


def spawn_payload(image: str, command: str, **extra: Any) -> dict[str, Any]:
    return {"image": image, "command": command, "shell": True, "timeout": 60, **extra}


def run(client: ContreeClient, image: str, command: str, **kwargs: Any) -> tuple[RunOutcome, bytes]:
    shown: list[bytes] = []
    outcome = run_operation(
        client, spawn_payload(image, command, disposable=kwargs.pop("disposable", True)),
        on_stdout=shown.append, **kwargs,
    )
    return outcome, b"".join(shown)


def test_resolve_image_tag_to_uuid(client: ContreeClient, live: Any) -> None:
    assert client.resolve_image("tag:busybox:latest") == live.busybox
    assert client.resolve_image("busybox:latest") == live.busybox
    assert client.resolve_image(live.busybox) == live.busybox
    with pytest.raises(NotFound, match="HTTP 404"):
        client.resolve_image("tag:no-such-image:latest")


def test_list_dir_of_an_image(client: ContreeClient, live: Any) -> None:
    listing = client.list_dir(live.busybox, "/bin")
    names = {item["path"] for item in listing["files"]}
    assert "sh" in names
    assert "total" in client.list_dir_text(live.busybox, "/bin")
    with pytest.raises(NotFound):
        client.list_dir(live.busybox, "/no/such/dir")


def test_download_a_file_written_by_a_run(client: ContreeClient, live: Any) -> None:
    outcome, _ = run(client, live.busybox, "printf 'hello\\n' > /greeting", disposable=False)
    assert outcome.status == "SUCCESS", outcome.error
    assert outcome.result_image and outcome.result_image != live.busybox
    assert client.download(outcome.result_image, "/greeting") == b"hello\n"
    assert b"".join(client.iter_download(outcome.result_image, "/greeting")) == b"hello\n"
    with pytest.raises(Unprocessable):
        client.download(outcome.result_image, "/bin")


def test_run_echo_streams_output(client: ContreeClient, live: Any) -> None:
    outcome, shown = run(client, live.busybox, "echo hi")
    assert shown == b"hi\n"
    assert outcome.stdout == b"hi\n"
    assert outcome.status == "SUCCESS"
    assert outcome.exit_code == 0
    assert not outcome.interrupted
    assert outcome.result_image is None  # disposable


def test_run_reports_non_zero_exit_code(client: ContreeClient, live: Any) -> None:
    errors: list[bytes] = []
    outcome, _ = run(client, live.busybox, "echo oops >&2; exit 3", on_stderr=errors.append)
    assert outcome.status == "SUCCESS"
    assert outcome.exit_code == 3
    assert outcome.exit_status == 3
    assert b"".join(errors) == b"oops\n" == outcome.stderr


def test_stdin_piped_to_cat(client: ContreeClient, live: Any) -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"piped line\n")
    os.close(write_fd)
    try:
        outcome, shown = run(client, live.busybox, "cat", stdin=PipeStdin(read_fd))
    finally:
        os.close(read_fd)
    assert shown == b"piped line\n"
    assert outcome.exit_code == 0


def test_large_binary_stdin_arrives_intact(client: ContreeClient, live: Any) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with os.fdopen(write_fd, "wb") as fh:
            fh.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        outcome, shown = run(client, live.busybox, "md5sum", stdin=PipeStdin(read_fd))
    finally:
        writer.join()
        os.close(read_fd)
    assert shown.split()[0].decode() == hashlib.md5(data).hexdigest()
    assert outcome.exit_code == 0


def test_stdin_written_while_the_command_runs_is_forwarded(client: ContreeClient, live: Any) -> None:
    payload = b"late \x00binary\xff input\n"
    read_fd, write_fd = os.pipe()
    state = {"writer": write_fd}

    def on_stdout(chunk: bytes) -> None:
        # The command is running and waiting on stdin: only now does input arrive.
        if b"ready" in chunk and state["writer"] >= 0:
            os.write(state["writer"], payload)
            os.close(state["writer"])
            state["writer"] = -1

    try:
        outcome = run_operation(
            client, spawn_payload(live.busybox, "echo ready; cat; echo done", disposable=True),
            on_stdout=on_stdout, stdin=PipeStdin(read_fd),
        )
    finally:
        if state["writer"] >= 0:
            os.close(state["writer"])
        os.close(read_fd)
    assert outcome.stdout == b"ready\n" + payload + b"done\n"
    assert outcome.exit_code == 0


def test_tty_lines_are_forwarded_and_the_run_does_not_wait_for_eof(
    client: ContreeClient, live: Any
) -> None:
    master, slave = os.openpty()

    def on_stdout(chunk: bytes) -> None:
        if b"ready" in chunk:
            os.write(master, b"typed\n")

    try:
        outcome = run_operation(
            client, spawn_payload(live.busybox, "echo ready; read x; echo got:$x", disposable=True),
            on_stdout=on_stdout, stdin=TtyLineStdin(slave),
        )
    finally:
        os.close(master)
        os.close(slave)
    assert outcome.stdout == b"ready\ngot:typed\n"
    assert outcome.exit_code == 0


def test_ctrl_c_once_interrupts_the_command(client: ContreeClient, live: Any) -> None:
    notices: list[str] = []

    def on_stdout(chunk: bytes) -> None:
        if b"started" in chunk:
            raise KeyboardInterrupt

    outcome = run_operation(
        client, spawn_payload(live.busybox, "echo started; sleep 100", disposable=True),
        on_stdout=on_stdout, on_notice=notices.append,
    )
    assert notices == [f"Sent SIGINT to operation {outcome.op}; Ctrl-C again to cancel it"]
    assert not outcome.interrupted
    assert outcome.signal == 2
    assert outcome.exit_status == 130
    assert outcome.stdout == b"started\n"
    assert outcome.duration < 60


def test_ctrl_c_twice_cancels_operation(client: ContreeClient, live: Any) -> None:
    notices: list[str] = []
    # The trap survives the first SIGINT and prints a line, which presses Ctrl-C again.
    command = "trap 'echo got-int' INT; echo started; while :; do sleep 1; done"

    def on_stdout(chunk: bytes) -> None:
        if b"started" in chunk or b"got-int" in chunk:
            raise KeyboardInterrupt

    outcome = run_operation(
        client, spawn_payload(live.busybox, command, disposable=True),
        on_stdout=on_stdout, on_notice=notices.append,
    )
    assert notices == [
        f"Sent SIGINT to operation {outcome.op}; Ctrl-C again to cancel it",
        f"Cancelled operation {outcome.op}",
    ]
    assert outcome.interrupted
    assert outcome.stdout == b"started\ngot-int\n"  # nothing lost, nothing repeated
    assert client.get_operation(outcome.op)["status"] == "CANCELLED"
    assert outcome.status == "CANCELLED"


def test_events_of_a_finished_operation_end_with_completion(client: ContreeClient, live: Any) -> None:
    outcome, _ = run(client, live.busybox, "echo a; echo b >&2")
    events = list(client.iter_events(outcome.op, follow=False))
    assert events[-1]["type"] == "completion"
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids))
    resumed = list(client.iter_events(outcome.op, since=ids[1]))
    assert [e["id"] for e in resumed] == ids[2:]


def test_files_are_uploaded_once_by_content(client: ContreeClient, tmp_path: Path) -> None:
    data = os.urandom(64)
    first = client.ensure_file(data)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert client.ensure_file(path) == first


def test_whoami_answers(client: ContreeClient) -> None:
    assert "permissions" in client.whoami()


def test_local_profile_starts_the_server_on_demand(live: Any, tmp_path: Path) -> None:
    home = tmp_path / "srv"
    env = {**live.env, "CONTREE_SERVER_HOME": str(home)}
    profile = Profile(name="local", url=f"unix://{home}/server.sock", type="local")
    old = os.environ.get("CONTREE_SERVER_HOME")
    os.environ["CONTREE_SERVER_HOME"] = str(home)
    try:
        ensure_local_server(profile)
        assert socket_answers(home / "server.sock")
        with ContreeClient.for_profile(profile) as api:  # already running: no second start
            assert "permissions" in api.whoami()
    finally:
        if old is None:
            del os.environ["CONTREE_SERVER_HOME"]
        else:
            os.environ["CONTREE_SERVER_HOME"] = old
        subprocess.run(
            [sys.executable, "-m", "contree_shell", "server", "stop"], env=env,
            capture_output=True, timeout=60,
        )


def test_local_server_start_failure_is_one_line(live: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    home = blocker / "srv"  # cannot be created: its parent is a file
    profile = Profile(name="local", url=f"unix://{home}/server.sock", type="local")
    with pytest.raises(ServerStartError) as err:
        ensure_local_server(profile, timeout=20)
    assert "\n" not in err.value.message
    assert err.value.message.startswith("Cannot start the local server: ")
