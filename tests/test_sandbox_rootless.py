"""Rootless mode: a real unprivileged user starts sandboxes in a user namespace.

The test (as root) creates the user if missing, then runs a small script as that user
with ``runuser``; the script builds its own busybox image and reports what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import contree_shell

pytestmark = pytest.mark.root

USER = "contree-rootless"
REPO = str(Path(contree_shell.__file__).resolve().parent.parent)

SCRIPT = textwrap.dedent("""
    import json, os, shutil, stat, sys, tempfile
    from pathlib import Path
    from contree_shell.sandbox import runtime
    from contree_shell.sandbox.bootstrap import build_busybox_rootfs
    from contree_shell.sandbox.cgroups import Limits
    from contree_shell.sandbox.runtime import RunSpec, Sandbox

    if sys.argv[1] == "single":
        runtime.SUBUIDS = None  # as on a host without /etc/subuid for this user
    base = Path(tempfile.mkdtemp(prefix="contree-rootless-"))
    img = base / "img"
    build_busybox_rootfs(img)
    (img / "olddir").mkdir()
    (img / "olddir" / "f").write_text("x")

    def run(cmd, **kw):
        r = Path(tempfile.mkdtemp(dir=base))
        (r / "u").mkdir(); (r / "w").mkdir()
        out = bytearray()
        sb = Sandbox.start(lowers=[img], upper=r / "u", work=r / "w",
                           spec=RunSpec(argv=["sh", "-c", cmd], env={"PATH": "/bin"},
                                        timeout=30, **kw),
                           on_output=lambda s, c: out.extend(c))
        info = sb.wait(60)
        upper = {}
        for p in sorted((r / "u").rglob("*")):
            st = p.lstat()
            xattrs = {n: os.getxattr(p, n, follow_symlinks=False).decode()
                      for n in os.listxattr(p, follow_symlinks=False)}
            upper[str(p.relative_to(r / "u"))] = {
                "uid": st.st_uid, "whiteout": stat.S_ISCHR(st.st_mode) and st.st_rdev == 0,
                "xattrs": xattrs}
        return {"exit": info.exit_code, "error": info.error, "out": out.decode(), "upper": upper}

    res = {"uid": os.getuid(), "mode": runtime.mode(),
           "ids": run("id -u; id -g; cat /proc/self/uid_map | wc -l"),
           "files": run("echo hi > /new; rm /etc/passwd; rm -rf /olddir; mkdir /olddir"),
           "limited": run("echo fine", limits=Limits(pids=5, memory_bytes=1 << 26))}
    def opened(d):  # overlay leaves 000 dirs in work/: open them up top-down
        os.chmod(d, 0o700)
        for e in os.scandir(d):
            if e.is_dir(follow_symlinks=False):
                opened(e.path)
    opened(base)
    shutil.rmtree(base)
    print(json.dumps(res))
""")


def _python_for(user: str) -> list[str] | None:
    """A Python the user can run with this repo and its dependencies importable."""
    venv_site = [p for p in sys.path if p.endswith("site-packages")]
    env = ["env", f"PYTHONPATH={os.pathsep.join([REPO, *venv_site])}"]
    major_minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, shutil.which(major_minor), f"/usr/bin/{major_minor}"):
        if not exe or not os.path.exists(exe):
            continue
        probe = subprocess.run(["runuser", "-u", user, "--", *env, exe, "-c",
                                "import contree_shell.sandbox.runtime"],
                               capture_output=True, cwd="/", check=False)  # fmt: skip
        if probe.returncode == 0:
            return [*env, exe]
    return None


@pytest.fixture(scope="module")
def rootless_python() -> list[str]:
    if os.geteuid() != 0:
        pytest.skip("creating the unprivileged user needs root")
    if not shutil.which("runuser") or not Path("/bin/busybox").exists():
        pytest.skip("runuser or busybox-static is missing")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        made = subprocess.run(["useradd", "-M", "-s", "/bin/sh", USER], capture_output=True,
                              check=False)  # fmt: skip
        if made.returncode != 0:
            pytest.skip(f"cannot create user {USER}: {made.stderr.decode().strip()}")
    python = _python_for(USER)
    if python is None:
        pytest.skip(f"no Python with this repo's dependencies is runnable as {USER}")
    return python


def run_as_user(python: list[str], kind: str) -> dict:
    proc = subprocess.run(["runuser", "-u", USER, "--", *python, "-c", SCRIPT, kind],
                          capture_output=True, text=True, cwd="/", timeout=300, check=False)  # fmt: skip
    if "refuses user namespaces" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_common(res: dict) -> None:
    assert res["mode"]["mode"] == "rootless" and res["mode"]["limits"] is False
    assert res["mode"]["network"] == (shutil.which("slirp4netns") is not None
                                      and os.stat("/dev/net/tun").st_mode & 0o006 == 0o006)
    ids = res["ids"]
    assert ids["exit"] == 0 and ids["error"] is None
    assert ids["out"].split()[:2] == ["0", "0"]  # root of its own user namespace
    files = res["files"]
    assert files["exit"] == 0, files
    upper = files["upper"]
    assert upper["new"]["uid"] == res["uid"]  # namespace root is the user on the host
    assert upper["etc/passwd"]["whiteout"]
    # userxattr: overlay's markers are user.* (the store's own format is trusted.*).
    assert upper["olddir"]["xattrs"].get("user.overlay.opaque") == "y"
    limited = res["limited"]
    assert limited["exit"] == 0 and limited["out"] == "fine\n"  # limits skipped, not fatal


def test_unprivileged_user_runs_sandboxes_with_a_single_uid_map(
        rootless_python: list[str]) -> None:  # fmt: skip
    res = run_as_user(rootless_python, "single")
    check_common(res)
    assert res["mode"]["uid_map"] == "single"
    assert res["ids"]["out"].split()[2] == "1"


def test_unprivileged_user_with_subuids_gets_the_full_range(
        rootless_python: list[str]) -> None:  # fmt: skip
    if not shutil.which("newuidmap") or f"{USER}:" not in Path("/etc/subuid").read_text():
        pytest.skip("newuidmap or an /etc/subuid range for the user is missing")
    res = run_as_user(rootless_python, "full")
    check_common(res)
    assert res["mode"]["uid_map"] == "full"
    assert res["ids"]["out"].split()[2] == "2"  # own uid as 0, the subuid range from 1
