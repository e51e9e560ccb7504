"""How fast `contree shell` is where people feel it: startup and Tab.

Prints figures, asserts nothing.

1. Time from process start to the first prompt, for our `contree shell` and for the
   official `contree-cli` shell (0.9.4 unless --official-version), both talking to the
   same local server over TCP (`contree server run --listen 127.0.0.1:PORT`, bearer
   token from `contree server token`). Each shell runs in a pseudo-terminal; the clock
   stops when the prompt text `) … $ ` is on screen. The official CLI is installed into
   a throwaway venv (or pass --official PATH to its `contree` executable). Both CLIs use
   their own temporary CONTREE_HOME; the update check is disabled for both.
   Target: ours <= official.
2. Keystroke-to-completion latency for a sandbox directory, in process: the shell's own
   completer's get_completions on a Document (`cat /etc/`), with an empty completion
   cache (uncached: a listing request to the server) and after one fill (cached), through
   the built-in `local` profile (unix socket) and through the TCP profile.
   Targets: cached <= 5 ms, uncached <= 30 ms.

Usage: python benchmarks/bench_shell.py [--runs N] [--official PATH] [--no-official]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
# `(branch) cwd $`, colours and readline's \x01/\x02 markers allowed between the parts.
PROMPT = re.compile(rb"\([\w.+-]+\)(?:\x1b\[[0-9;?]*[A-Za-z]|[\x01\x02 ]|[~/][\w/.~-]*)*\$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTREE_", "XDG_"))}
    env.update(
        CONTREE_SERVER_HOME=str(root / "server"),
        XDG_CONFIG_HOME=str(root / "xdg-config"),
        XDG_DATA_HOME=str(root / "xdg-data"),
        XDG_CACHE_HOME=str(root / "xdg-cache"),
        CONTREE_NO_UPDATE_CHECK="1",
        PYTHONPATH=str(REPO),
        TERM="xterm-256color",
    )
    return env


def ours(*args: str, env: dict[str, str], timeout: float = 120) -> str:
    result = subprocess.run([sys.executable, "-m", "contree_shell", *args], env=env,
                            capture_output=True, text=True, timeout=timeout, check=False,
                            input="")
    if result.returncode != 0:
        raise SystemExit(f"contree {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def start_server(env: dict[str, str], port: int) -> tuple[subprocess.Popen[bytes], str]:
    token = ours("server", "token", env=env).strip()
    proc = subprocess.Popen(
        [sys.executable, "-m", "contree_shell", "server", "run", "--listen", f"127.0.0.1:{port}",
         "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 60
    headers = {"Authorization": f"Bearer {token}"}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited at startup")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/whoami", headers=headers,
                         timeout=2).status_code == 200:
                return proc, token
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.terminate()
    raise SystemExit("the server did not answer on TCP")


def import_busybox(port: int, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as http:
        resp = http.post("/v1/images/import",
                         json={"registry": {"url": "busybox:"}, "tag": "busybox:latest"})
        resp.raise_for_status()
        op = resp.json()["uuid"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = http.get(f"/v1/operations/{op}").json()["status"]
            if status in ("SUCCESS", "FAILED", "CANCELLED"):
                if status != "SUCCESS":
                    raise SystemExit(f"busybox import ended {status}")
                return
            time.sleep(0.05)
    raise SystemExit("busybox import did not finish")


def write_auth(home: Path, url: str, token: str) -> None:
    """auth.ini in the official format (both CLIs read it)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "auth.ini").write_text(
        f"[DEFAULT]\nprofile = bench\n\n[profile:bench]\nurl = {url}\ntoken = {token}\n"
        "type = jwt\n"
    )


def time_to_prompt(argv: list[str], env: dict[str, str], timeout: float = 60) -> float:
    """Seconds from spawning `argv` in a pty to the prompt appearing."""
    import pexpect

    started = time.perf_counter()
    child = pexpect.spawn(argv[0], argv[1:], env=env, dimensions=(40, 120), timeout=timeout)
    try:
        child.expect(PROMPT)
        elapsed = time.perf_counter() - started
        child.sendcontrol("d")
        child.expect(pexpect.EOF, timeout=10)
    finally:
        child.close(force=True)
    return elapsed


def install_official(version: str, root: Path) -> str:
    venv = root / "official-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"contree-cli=={version}"],
                   check=True)
    return str(venv / "bin" / "contree")


def bench_startup(args: argparse.Namespace, root: Path, env: dict[str, str], url: str,
                  token: str) -> None:
    our_env = dict(env, CONTREE_HOME=str(root / "ours"), CONTREE_SESSION="bench-ours")
    write_auth(root / "ours", url, token)
    ours("use", "tag:busybox:latest", env=our_env)
    ours("shell", env=our_env)  # warm: first-run files (shell.toml, state DB), .pyc
    our_argv = [sys.executable, "-m", "contree_shell", "shell"]
    our_times = [time_to_prompt(our_argv, our_env) for _ in range(args.runs)]
    report("ours: process start -> first prompt", our_times)

    if args.no_official:
        return
    official = args.official or install_official(args.official_version, root)
    off_env = dict(env, CONTREE_HOME=str(root / "official"), CONTREE_SESSION="bench-official")
    off_env.pop("PYTHONPATH", None)
    subprocess.run([official, "auth", "--token", token, "--url", url, "--type", "jwt"],
                   env=off_env, check=False, capture_output=True, timeout=60)
    if not (root / "official" / "auth.ini").exists():
        write_auth(root / "official", url, token)
    subprocess.run([official, "use", "tag:busybox:latest"], env=off_env, check=False,
                   capture_output=True, timeout=120)
    time_to_prompt([official, "shell"], off_env)  # warm
    off_times = [time_to_prompt([official, "shell"], off_env) for _ in range(args.runs)]
    report(f"official contree-cli {args.official_version}: process start -> first prompt",
           off_times)
    ratio = statistics.median(our_times) / statistics.median(off_times)
    print(f"startup ratio ours/official (median): {ratio:.2f}  (target <= 1.00)")


def bench_completion(args: argparse.Namespace, root: Path, env: dict[str, str],
                     home: str, label: str) -> None:
    """Tab latency through the profile configured in CONTREE_HOME=`home`."""
    our_env = dict(env, CONTREE_HOME=home, CONTREE_SESSION=f"bench-{label.split()[0]}")
    ours("use", "tag:busybox:latest", env=our_env)
    os.environ.update(our_env)
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from contree_shell.cli.main import make_context
    from contree_shell.shell import builtins, commands
    from contree_shell.shell.completion.completer import ContreeCompleter
    from contree_shell.shell.completion.sources import Sources
    from contree_shell.shell.context import ShellContext
    from contree_shell.state.cache import CompletionCache

    ctx = make_context(in_shell=True)
    sh = ShellContext(ctx)
    commands.shell_parser()  # built once per shell, before anyone presses Tab
    ctx.client.whoami()  # the shell's client is connected before the first Tab
    document = Document("cat /etc/")

    def completer(cache: CompletionCache) -> ContreeCompleter:
        return ContreeCompleter(Sources(ctx, cache), parser=commands.shell_parser,
                                builtins=builtins.help_map, cwd=sh.cwd, image=sh.image)

    def once(comp: ContreeCompleter) -> tuple[float, int]:
        started = time.perf_counter()
        found = list(comp.get_completions(document, CompleteEvent(completion_requested=True)))
        return time.perf_counter() - started, len(found)

    uncached: list[float] = []
    cached: list[float] = []
    count = 0
    for i in range(args.runs * 3):
        cache = CompletionCache(root / f"cache-{label}-{i}.db")  # empty
        comp = completer(cache)
        elapsed, count = once(comp)
        uncached.append(elapsed)
        cached.append(once(comp)[0])
        comp.sources.close()
        cache.close()
    print(f"[{label}] completion of `cat /etc/` offers {count} entries")
    report(f"[{label}] Tab on a sandbox dir, uncached (target <= 30 ms)", uncached, ms=True)
    report(f"[{label}] Tab on a sandbox dir, cached (target <= 5 ms)", cached, ms=True)


def report(label: str, samples: list[float], *, ms: bool = False) -> None:
    scale, unit = (1000.0, "ms") if ms else (1.0, "s")
    med = statistics.median(samples) * scale
    lo, hi = min(samples) * scale, max(samples) * scale
    print(f"{label}: median {med:.3f} {unit} (min {lo:.3f}, max {hi:.3f}, n={len(samples)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--official", help="path to the official `contree` executable")
    parser.add_argument("--official-version", default="0.9.4")
    parser.add_argument("--no-official", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-shell-"))
    env = base_env(root)
    port = free_port()
    proc, token = start_server(env, port)
    url = f"http://127.0.0.1:{port}"
    try:
        import_busybox(port, token)
        bench_startup(args, root, env, url, token)
        # The built-in `local` profile (unix socket: how the shell is normally used) and
        # the TCP profile the startup comparison used.
        bench_completion(args, root, env, str(root / "local"), "local unix socket")
        bench_completion(args, root, env, str(root / "ours"), "tcp")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
