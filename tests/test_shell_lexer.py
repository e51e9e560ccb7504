"""Highlighting of shell input: contree commands and builtins are keywords, the rest Bash."""

from __future__ import annotations

from pygments.token import Keyword, Name, Punctuation, Token

from contree_shell.shell.lexer import ContreeShellLexer


def tokens(text: str) -> list[tuple[object, str]]:
    """Non-blank tokens, as (type, value)."""
    return [(t, v) for t, v in ContreeShellLexer().get_tokens(text) if v.strip()]


def test_contree_and_its_subcommands() -> None:
    assert tokens("contree session checkout main")[:3] == [
        (Keyword, "contree"), (Name.Function, "session"), (Name.Function, "checkout"),
    ]


def test_contree_flags_are_not_subcommands() -> None:
    toks = tokens("contree -o json images")
    assert toks[0] == (Keyword, "contree")
    assert (Name.Function, "-o") not in toks


def test_builtins_are_keywords() -> None:
    for name in ("cd", "pwd", "history", "help", "clear", "timeout", "exit", "quit", "ls", "cat"):
        assert tokens(f"{name} x")[0] == (Keyword, name)


def test_builtin_after_leading_spaces() -> None:
    assert tokens("   cd /tmp")[0] == (Keyword, "cd")


def test_a_word_that_only_starts_like_a_builtin_is_not_one() -> None:
    assert tokens("cdrecord x")[0][0] is not Keyword
    assert tokens("contreex")[0][0] is not Keyword


def test_everything_else_is_bash() -> None:
    toks = tokens("echo hi | grep h")
    assert toks[0] == (Name.Builtin, "echo")
    assert (Punctuation, "|") in toks


def test_builtin_arguments_are_bash_too() -> None:
    toks = tokens("timeout 5m echo $HOME")
    assert toks[0] == (Keyword, "timeout")
    assert any(t in Token.Name.Variable for t, _ in toks)


def test_the_text_round_trips() -> None:
    text = "contree run -- sh -c 'echo \"a b\"'\necho 'x\ny'"
    assert "".join(v for _, v in ContreeShellLexer().get_tokens(text)) == text + "\n"
