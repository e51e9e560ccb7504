"""Tab completion in bash, zsh and fish: the scripts in completions/, `contree completion`,
and the hidden `contree __complete` that drives the shell's own completion engine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contree_shell.cli.completion import SCRIPT_FILES, SCRIPTS, candidates

REPO = Path(__file__).resolve().parent.parent
COMPLETIONS = REPO / "completions"


@pytest.fixture
def path_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH has a `contree` running this checkout, and no profile."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "contree"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m contree_shell "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONPATH"] = str(REPO)
    env["CONTREE_HOME"] = str(tmp_path / "home")
    env["CONTREE_SERVER_HOME"] = str(tmp_path / "server")  # nothing listens: no remote data
    env["CONTREE_SESSION"] = "completion-test"
    for name in ("CONTREE_PROFILE", "CONTREE_SESSION_DB", "COMP_LINE", "COMP_POINT"):
        env.pop(name, None)
    return env


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


def test_shipped_scripts_match_what_contree_completion_prints() -> None:
    for shell, name in SCRIPT_FILES.items():
        assert (COMPLETIONS / name).read_text() == SCRIPTS[shell], name


def test_contree_completion_prints_the_script(path_env: dict[str, str]) -> None:
    result = subprocess.run(["contree", "completion", "bash"], env=path_env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == SCRIPTS["bash"]
    bad = subprocess.run(["contree", "completion", "tcsh"], env=path_env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2


def test_candidates_come_from_the_shell_engine() -> None:
    assert candidates("contree ses") == ["session"]
    assert "rollback" in candidates("contree session ")
    assert candidates("contree op ca") == ["cancel"]
    assert candidates("contree grep --ca") == ["--case"]
    assert candidates("contree grep --case ") == ["insensitive", "sensitive", "smart"]
    assert "shell" in candidates("contree sh")  # hidden in the REPL, offered here
    assert candidates("/usr/local/bin/contree ps --sh") == ["--show-max"]


def test_bash_splits_words_at_colons_and_gets_the_tail_back() -> None:
    # `--output=js`: bash's COMP_WORDS has `js` as the current word.
    assert candidates("contree --output=js", cur="js") == ["json", "json-pretty"]


def test_hidden_command_never_fails(path_env: dict[str, str]) -> None:
    result = subprocess.run(["contree", "__complete", "--shell", "bash", "--", "contree 'unclosed"],
                            env=path_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == ""
    via_env = subprocess.run(["contree", "__complete"], capture_output=True, text=True,
                             env=dict(path_env, COMP_LINE="contree sessi", COMP_POINT="13"),
                             timeout=60)
    assert _lines(via_env.stdout) == ["session"]


def test_bash_script(path_env: dict[str, str]) -> None:
    script = (
        f"source {COMPLETIONS / 'contree.bash'}; "
        "COMP_WORDS=(contree ses); COMP_CWORD=1; _contree; printf '%s\\n' \"${COMPREPLY[@]}\"; "
        "COMP_WORDS=(contree session ch); COMP_CWORD=2; _contree; printf '%s\\n' \"${COMPREPLY[@]}\"; "
        "complete -p contree"
    )
    result = subprocess.run(["bash", "-c", script], env=path_env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert _lines(result.stdout) == ["session", "checkout", "complete -o default -F _contree contree"]


def test_bash_script_from_eval(path_env: dict[str, str]) -> None:
    script = (
        'eval "$(contree completion bash)"; COMP_LINE="contree op ev"; COMP_POINT=13; '
        "COMP_WORDS=(contree op ev); COMP_CWORD=2; _contree; printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    result = subprocess.run(["bash", "-c", script], env=path_env, capture_output=True,
                            text=True, timeout=120)
    assert _lines(result.stdout) == ["events"], result.stderr


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_script(path_env: dict[str, str]) -> None:
    # compadd/compdef are stubbed: the function is called the way zsh's completion
    # system calls it (words, CURRENT, PREFIX set) and what it adds is printed.
    script = (
        "compdef() { :; }; compadd() { print -r -- \"compadd $*\"; }; "
        f"source {COMPLETIONS / '_contree'}; "
        "words=(contree session br); CURRENT=3; PREFIX=br; _contree"
    )
    result = subprocess.run(["zsh", "-f", "-c", script], env=path_env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert _lines(result.stdout) == ["compadd -Q -U -- branch"]


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_script(path_env: dict[str, str]) -> None:
    script = f"source {COMPLETIONS / 'contree.fish'}; complete -C 'contree session ro'"
    result = subprocess.run(["fish", "--no-config", "-c", script], env=path_env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [line.split("\t")[0] for line in _lines(result.stdout)] == ["rollback"]


def test_status_values_are_offered() -> None:
    assert candidates("contree ps --status SU") == ["SUCCESS"]
