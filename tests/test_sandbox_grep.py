"""grep: ripgrep-like search over real overlay layers built in a temporary directory."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from contree_shell.sandbox.grep import compile_patterns, grep, translate
from contree_shell.sandbox.inspect import ImageView, PathNotFound

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts and trusted xattrs need root")


def write(root: Path, rel: str, data: str | bytes = "") -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


NUMBERED = "".join(f"line {i}\n" for i in range(1, 21))


@pytest.fixture
def view(tmp_path: Path) -> ImageView:
    bottom, top = tmp_path / "l0", tmp_path / "l1"
    write(bottom, "etc/passwd", "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home:/bin/sh\n")
    write(bottom, "etc/hosts", "127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
    write(bottom, "etc/gone", "root was here\n")
    write(bottom, "etc/app/app.conf", "Port 22\nport 80\nPORT 443\n")
    write(bottom, "etc/app/notes.txt", "nothing to see\n")
    write(bottom, "etc/app/sub/deep.conf", "port deep\n")
    write(bottom, "etc/.hidden", "root hidden\n")
    write(bottom, "opt/old/file", "root in a lower opaque dir\n")
    write(bottom, "data/numbers", NUMBERED)
    write(bottom, "data/bin.dat", b"root\x00binary\n")
    write(bottom, "data/late-nul", b"root\n" + b"x" * 20000 + b"\x00")
    write(bottom, "data/crlf", "root\r\nend\r\n")
    write(bottom, "data/noeol", "first\nroot at the end")
    write(bottom, "data/long", "root" + "x" * 5000 + "\n")
    write(bottom, "data/utf8", "café CAFÉ\nstraße\n")
    os.link(bottom / "data/numbers", bottom / "data/numbers-link")
    os.symlink("/etc/passwd", bottom / "data/pw-link")
    os.symlink("../../..", bottom / "data/escape")

    (top / "etc").mkdir(parents=True)
    os.mknod(top / "etc/gone", stat.S_IFCHR, os.makedev(0, 0))  # whiteout
    (top / "opt/old").mkdir(parents=True)
    os.setxattr(top / "opt/old", "trusted.overlay.opaque", b"y")
    write(top, "opt/old/new", "fresh\n")
    write(top, "etc/hosts", "10.0.0.1 top root-host\n")
    return ImageView([bottom, top])


def paths_of(result: dict) -> list[str]:
    seen: list[str] = []
    for m in result["matches"]:
        if m["path"] not in seen:
            seen.append(m["path"])
    return seen


def test_result_shape_and_match_fields(view: ImageView) -> None:
    r = grep(view, patterns=["alice"], paths=["/etc"])
    assert set(r) == {"path", "patterns", "matches", "truncated"}
    assert r["path"] == "/etc" and r["patterns"] == ["alice"] and r["truncated"] is False
    (m,) = r["matches"]
    assert m == {
        "path": "/etc/passwd",
        "line_number": 2,
        "absolute_offset": len("root:x:0:0:root:/root:/bin/sh\n"),
        "line_text": "alice:x:1000:1000::/home:/bin/sh\n",
        "line_bytes": len("alice:x:1000:1000::/home:/bin/sh\n"),
        "submatches": [{"text": "alice", "start": 0, "end": 5}],
        "type": "match",
    }


def test_default_path_is_root_and_results_follow_walk_order(view: ImageView) -> None:
    r = grep(view, patterns=["root"])
    assert r["path"] == "/"
    assert paths_of(r) == [
        "/data/crlf",
        "/data/long",
        "/data/noeol",
        "/etc/.hidden",
        "/etc/hosts",
        "/etc/passwd",
    ]


def test_whiteouts_and_opaque_dirs_hide_lower_files(view: ImageView) -> None:
    r = grep(view, patterns=["root", "fresh"])
    found = paths_of(r)
    assert "/etc/gone" not in found and "/opt/old/file" not in found
    assert "/opt/old/new" in found


def test_symlinks_are_not_followed_while_walking(view: ImageView) -> None:
    r = grep(view, patterns=["alice"], paths=["/data"])
    assert r["matches"] == []  # pw-link points at /etc/passwd, escape at the root


def test_a_symlink_given_as_path_resolves_inside_the_image(view: ImageView) -> None:
    r = grep(view, patterns=["alice"], paths=["/data/pw-link"])
    assert [m["path"] for m in r["matches"]] == ["/data/pw-link"]
    r = grep(view, patterns=["alice"], paths=["/data/escape/etc"])
    assert [m["path"] for m in r["matches"]] == ["/etc/passwd"]


def test_binary_files_are_skipped_even_with_a_late_nul(view: ImageView) -> None:
    found = paths_of(grep(view, patterns=["root", "binary"], paths=["/data"]))
    assert "/data/bin.dat" not in found and "/data/late-nul" not in found
    assert grep(view, patterns=["binary"], paths=["/data/bin.dat"])["matches"] == []


def test_hidden_files_are_searched(view: ImageView) -> None:
    assert "/etc/.hidden" in paths_of(grep(view, patterns=["hidden"], paths=["/etc"]))


def test_patterns_are_ored_and_submatches_list_every_hit(view: ImageView) -> None:
    r = grep(view, patterns=["alice", "10\\.0"], paths=["/etc"])
    assert [(m["path"], m["line_number"]) for m in r["matches"]] == [
        ("/etc/hosts", 1),
        ("/etc/passwd", 2),
    ]
    r = grep(view, patterns=["line 1$", "line 2$"], paths=["/data/numbers"])
    assert [m["line_number"] for m in r["matches"]] == [1, 2]
    r = grep(view, patterns=["o", "r"], paths=["/etc/passwd"], max_count=1)
    subs = r["matches"][0]["submatches"]
    assert [(s["start"], s["end"]) for s in subs][:3] == [(0, 1), (1, 2), (2, 3)]
    assert all(s["text"] in ("o", "r") for s in subs)


def test_multiple_paths_are_concatenated_in_the_given_order(view: ImageView) -> None:
    r = grep(view, patterns=["root"], paths=["/etc/passwd", "/data/crlf", "/etc/.hidden"])
    assert paths_of(r) == ["/etc/passwd", "/data/crlf", "/etc/.hidden"]


def test_missing_path_raises_path_not_found(view: ImageView) -> None:
    with pytest.raises(PathNotFound):
        grep(view, patterns=["x"], paths=["/etc", "/nope"])
    with pytest.raises(PathNotFound):
        grep(view, patterns=["x"], paths=["/etc/gone"])


def test_line_text_keeps_terminators_and_is_capped(view: ImageView) -> None:
    (crlf,) = grep(view, patterns=["root"], paths=["/data/crlf"])["matches"]
    assert crlf["line_text"] == "root\r\n" and crlf["line_bytes"] == 6
    (last,) = grep(view, patterns=["root"], paths=["/data/noeol"])["matches"]
    assert last["line_text"] == "root at the end" and last["line_number"] == 2
    assert last["absolute_offset"] == 6
    (long,) = grep(view, patterns=["root"], paths=["/data/long"])["matches"]
    assert len(long["line_text"]) == 4096 and long["line_bytes"] == 5005


def test_a_dot_takes_a_whole_utf8_character(view: ImageView) -> None:
    (m,) = grep(view, patterns=["caf. "], paths=["/data/utf8"])["matches"]
    assert m["submatches"] == [{"text": "café ", "start": 0, "end": 6}]
    (m,) = grep(view, patterns=["stra.e"], paths=["/data/utf8"])["matches"]
    assert m["submatches"][0]["text"] == "straße"


def test_byte_offsets_with_utf8_text(view: ImageView) -> None:
    (m,) = grep(view, patterns=["CAF"], paths=["/data/utf8"])["matches"]
    assert m["submatches"] == [{"text": "CAF", "start": 6, "end": 9}]  # "café " is 6 bytes
    (m,) = grep(view, patterns=["straße"], paths=["/data/utf8"])["matches"]
    assert m["absolute_offset"] == len("café CAFÉ\n".encode()) and m["line_bytes"] == 8


def test_dollar_matches_before_the_newline_not_across_lines(view: ImageView) -> None:
    r = grep(view, patterns=["0$"], paths=["/data/numbers"])
    assert [m["line_number"] for m in r["matches"]] == [10, 20]
    # \s and negated classes never reach into the next line.
    r = grep(view, patterns=[r"line 9\s", "line 2[^0-9]"], paths=["/data/numbers"])
    assert r["matches"] == []
    r = grep(view, patterns=["^line 1"], paths=["/data/numbers"])
    assert [m["line_number"] for m in r["matches"]] == [1, *range(10, 20)]


def test_case_modes(view: ImageView) -> None:
    def lines(case: str, pattern: str) -> list[int]:
        r = grep(view, patterns=[pattern], paths=["/etc/app/app.conf"], case=case)
        return [m["line_number"] for m in r["matches"]]

    assert lines("sensitive", "port") == [2]
    assert lines("insensitive", "port") == [1, 2, 3]
    assert lines("smart", "port") == [1, 2, 3]
    assert lines("smart", "Port") == [1]
    assert lines("smart", r"\Sort") == [1, 2, 3]  # escapes are not uppercase letters
    assert lines("smart", r"\pLort") == [1, 2, 3]


def test_smart_case_looks_at_all_patterns(view: ImageView) -> None:
    r = grep(view, patterns=["port", "PORT"], paths=["/etc/app/app.conf"], case="smart")
    assert [m["line_number"] for m in r["matches"]] == [2, 3]


def test_insensitive_folds_non_ascii_literals(view: ImageView) -> None:
    r = grep(view, patterns=["café"], paths=["/data/utf8"], case="insensitive")
    subs = r["matches"][0]["submatches"]
    assert [s["text"] for s in subs] == ["café", "CAFÉ"]


def test_context_lines_are_typed_and_merged_without_duplicates(view: ImageView) -> None:
    r = grep(view, patterns=["^line (5|7)$"], paths=["/data/numbers"], before=2, after=2)
    got = [(m["line_number"], m["type"]) for m in r["matches"]]
    assert got == [
        (3, "context"),
        (4, "context"),
        (5, "match"),
        (6, "context"),
        (7, "match"),
        (8, "context"),
        (9, "context"),
    ]
    assert all(m["submatches"] == [] for m in r["matches"] if m["type"] == "context")
    assert r["matches"][0]["line_text"] == "line 3\n"
    assert r["matches"][0]["absolute_offset"] == NUMBERED.index("line 3\n")


def test_context_is_clipped_at_file_edges(view: ImageView) -> None:
    r = grep(view, patterns=["^line (1|20)$"], paths=["/data/numbers"], before=3, after=3)
    got = [(m["line_number"], m["type"]) for m in r["matches"]]
    assert got == [
        (1, "match"),
        (2, "context"),
        (3, "context"),
        (4, "context"),
        (17, "context"),
        (18, "context"),
        (19, "context"),
        (20, "match"),
    ]


def test_max_count_is_per_file_and_keeps_trailing_context(view: ImageView) -> None:
    r = grep(view, patterns=["line"], paths=["/data"], max_count=2, after=1)
    got = [(m["path"], m["line_number"], m["type"]) for m in r["matches"]]
    assert got == [
        ("/data/numbers", 1, "match"),
        ("/data/numbers", 2, "match"),
        ("/data/numbers", 3, "context"),
        ("/data/numbers-link", 1, "match"),
        ("/data/numbers-link", 2, "match"),
        ("/data/numbers-link", 3, "context"),
    ]
    assert r["truncated"] is False


def test_max_total_truncates_only_when_more_matches_exist(view: ImageView) -> None:
    r = grep(view, patterns=["line"], paths=["/data/numbers"], max_total=20)
    assert len(r["matches"]) == 20 and r["truncated"] is False
    r = grep(view, patterns=["line"], paths=["/data/numbers"], max_total=5)
    assert [m["line_number"] for m in r["matches"]] == [1, 2, 3, 4, 5]
    assert r["truncated"] is True
    r = grep(view, patterns=["line"], paths=["/data"], max_total=20)
    assert r["truncated"] is True  # numbers-link has more


def test_deadline_truncates(view: ImageView) -> None:
    r = grep(view, patterns=["line"], paths=["/"], deadline=-1.0)
    assert r["truncated"] is True and r["matches"] == []


def test_globs_match_the_relative_path(view: ImageView) -> None:
    def found(*globs: str, path: str = "/etc") -> list[str]:
        return paths_of(grep(view, patterns=["port|root|nothing"], paths=[path], globs=list(globs)))

    assert found("*.conf") == ["/etc/app/app.conf", "/etc/app/sub/deep.conf"]
    assert found("app/*.conf") == ["/etc/app/app.conf"]  # `*` stays within a component
    assert found("app/**/*.conf") == ["/etc/app/app.conf", "/etc/app/sub/deep.conf"]
    assert found("**/sub/*") == ["/etc/app/sub/deep.conf"]
    assert found("*.{txt,conf}", "!deep.*") == ["/etc/app/app.conf", "/etc/app/notes.txt"]
    top = ["/etc/hosts", "/etc/passwd"]
    assert found("!*.conf") == ["/etc/.hidden", "/etc/app/notes.txt", *top]
    assert found("!app/") == ["/etc/.hidden", *top]  # a pruned directory
    assert found("!sub") == ["/etc/.hidden", "/etc/app/app.conf", "/etc/app/notes.txt", *top]
    assert found("passw?", path="/") == ["/etc/passwd"]
    assert found("/etc/pass*", path="/") == ["/etc/passwd"]
    assert found("/pass*", path="/") == []  # anchored at the searched root


def test_later_globs_take_precedence(view: ImageView) -> None:
    def found(*globs: str) -> list[str]:
        return paths_of(grep(view, patterns=["port"], paths=["/etc/app"], globs=list(globs)))

    assert found("*.conf", "!deep.conf") == ["/etc/app/app.conf"]
    assert found("!deep.conf", "*.conf") == ["/etc/app/app.conf", "/etc/app/sub/deep.conf"]


def test_globs_do_not_filter_an_explicit_file(view: ImageView) -> None:
    r = grep(view, patterns=["alice"], paths=["/etc/passwd"], globs=["!passwd"])
    assert len(r["matches"]) == 1


def test_rust_syntax_is_translated(view: ImageView) -> None:
    def n(pattern: str, path: str = "/etc/passwd") -> int:
        return len(grep(view, patterns=[pattern], paths=[path])["matches"])

    assert n(r"(?<user>alice):x") == 1
    assert n(r"(?P<user>root)|(?P<user>alice)") == 2  # names may repeat
    assert n(r"\x{61}lice") == 1
    assert n(r"[[:digit:]]{4}") == 1
    assert n(r"^[[:alpha:]]+:x:0:") == 1
    assert n(r"\p{L}+:x:1000") == 1
    assert n(r"\bsh$") == 2
    assert n(r"\Aroot") == 1  # start of the text, not of every line
    assert n(r"the end\z", "/data/noeol") == 1
    assert n(r"\<alice\>") == 1
    assert n(r"a(?i)LICE") == 1
    assert n(r"(?i:ALICE)|zzz") == 1
    assert n("caf[ée]", "/data/utf8") == 1
    assert n(r"stra\x{df}e", "/data/utf8") == 1
    assert n(r"root[|&~]") == 0 and n(r"x[:|]0") == 1


@pytest.mark.parametrize(
    "pattern",
    [
        r"(?=root)",
        r"(?!root)",
        r"(?<=a)b",
        r"(?<!a)b",
        r"(a)\1",
        r"(?P<n>a)(?P=n)",
        r"[a-z&&[^aeiou]]",
        r"[a--b]",
        r"[[a-z]]",
        r"\p{Greek}",
        r"(?x) a",
        r"(?U)a+",
        r"a\n",
        r"(unclosed",
        r"unopened)",
        r"[unclosed",
        r"a{2,1}",
        r"*a",
        "\\",
        r"\q",
    ],
)
def test_untranslatable_patterns_raise_value_error(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid pattern"):
        compile_patterns([pattern])


def test_parameter_limits_raise_value_error(view: ImageView) -> None:
    bad = [
        {"patterns": []},
        {"patterns": ["a"] * 17},
        {"patterns": ["a" * 1025]},
        {"patterns": ["a"], "case": "upper"},
        {"patterns": ["a"], "before": 51},
        {"patterns": ["a"], "after": -1},
        {"patterns": ["a"], "max_count": 0},
        {"patterns": ["a"], "max_total": 10001},
        {"patterns": ["a"], "paths": ["/"] * 17},
        {"patterns": ["a"], "globs": ["{unclosed"]},
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            grep(view, **kw)
    assert grep(view, patterns=["a" * 1024], paths=["/etc"])["matches"] == []


def test_empty_pattern_matches_every_line(view: ImageView) -> None:
    r = grep(view, patterns=[""], paths=["/data/noeol"])
    assert [m["line_number"] for m in r["matches"]] == [1, 2]


def test_translate_is_a_pure_function() -> None:
    assert translate(r"(?<x>a)\z") == r"(?:a)\Z"
    assert translate("é", icase=True) in (r"(?:\xc3\x89|\xc3\xa9)", r"(?:\xc3\xa9|\xc3\x89)")


def test_non_utf8_file_names_are_reported_with_replacement_characters(tmp_path: Path) -> None:
    layer = tmp_path / "l"
    layer.mkdir()
    with open(os.fsencode(layer) + b"/caf\xe9.txt", "wb") as f:
        f.write(b"root\n")
    (m,) = grep(ImageView([layer]), patterns=["root"])["matches"]
    assert m["path"] == "/caf\ufffd.txt"
    m["path"].encode("utf-8")  # JSON-safe
