"""ripgrep-like search over an image's files, read straight from its overlay layers.

Semantics follow ``rg --json`` as the Contree API describes it: patterns are OR-ed, a
match never spans a line terminator, symlinks met while walking are not followed,
hidden files are searched, ignore files are ignored, files containing a NUL byte are
binary and skipped, and results come in walk order (depth-first, names sorted).

Everything works on bytes: offsets are byte offsets, text is decoded for output with
``errors="replace"``. Files are memory-mapped, so searching a large file costs address
space, not memory, and the regex engine scans it in C.

Patterns use Rust regex syntax; :func:`translate` rewrites the common differences into
Python ``re`` syntax and rejects, with ``ValueError("invalid pattern …")``, what Rust
would reject (look-around, backreferences) or what cannot be expressed faithfully.
"""

from __future__ import annotations

import mmap
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from contree_shell.sandbox.inspect import EntryStat, ImageView, lookup

MAX_PATTERNS = 16
MAX_PATTERN_LEN = 1024
MAX_PATHS = 16
MAX_CONTEXT = 50
MAX_COUNT_LIMIT = 10000
LINE_TEXT_CAP = 4096
SUBMATCH_TEXT_CAP = 4096
MAX_SUBMATCHES = 1000  # per line; a pathological line cannot blow up the response
OUTPUT_BUDGET = 32 * 1024 * 1024  # bytes of line text across all results → truncated
CASE_MODES = ("sensitive", "insensitive", "smart")


# ------------------------------------------------------------------------ regex syntax


_POSIX_CLASSES = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7F",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1F\\x7F",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}

# Unicode classes that have an ASCII meaning on bytes; others are rejected.
_UNICODE_CLASSES = {
    "L": "A-Za-z",
    "Letter": "A-Za-z",
    "Alphabetic": "A-Za-z",
    "Lu": "A-Z",
    "Uppercase_Letter": "A-Z",
    "Uppercase": "A-Z",
    "Ll": "a-z",
    "Lowercase_Letter": "a-z",
    "Lowercase": "a-z",
    "N": "0-9",
    "Nd": "0-9",
    "Number": "0-9",
    "Decimal_Number": "0-9",
    "Digit": "0-9",
    "P": "!-/:-@\\[-`{-~",
    "Punctuation": "!-/:-@\\[-`{-~",
    "White_Space": "\\t\\n\\v\\f\\r ",
    "Whitespace": "\\t\\n\\v\\f\\r ",
    "ASCII": "\\x00-\\x7F",
}

_ANY_CHAR = r"(?:[\x00-\x09\x0b-\x7f]|[\xc2-\xf4][\x80-\xbf]{1,3}|[\x80-\xff])"
_SIMPLE_ESCAPES = set("dDwWsSbBAaftnrv.+*?()|[]{}^$#&-~ \\/\"'!%,:;<=>@_`")


class _PatternError(Exception):
    pass


def _hex_escape(text: str, i: int) -> tuple[str, int]:
    """Parse Rust's ``\\xHH`` / ``\\x{H…}`` / ``\\uHHHH`` / ``\\u{…}`` / ``\\UHHHHHHHH``
    starting at the letter; return the code point as a Python escape and the next index."""
    kind = text[i]
    if i + 1 < len(text) and text[i + 1] == "{":
        end = text.find("}", i + 2)
        if end < 0:
            raise _PatternError("unclosed hex escape")
        digits, nxt = text[i + 2 : end], end + 1
    else:
        n = {"x": 2, "u": 4, "U": 8}[kind]
        digits, nxt = text[i + 1 : i + 1 + n], i + 1 + n
    try:
        cp = int(digits, 16)
        ch = chr(cp)
    except (ValueError, OverflowError):
        raise _PatternError(f"invalid hex escape \\{kind}{digits}") from None
    return _literal(ch), nxt


def _literal(ch: str) -> str:
    """A single character as Python regex text matching its UTF-8 bytes."""
    if ord(ch) < 0x80:
        return re.escape(ch)
    return "".join(f"\\x{b:02x}" for b in ch.encode("utf-8"))


def _translate_class(text: str, i: int, icase: bool) -> tuple[str, int]:
    """Translate a bracket class starting at ``text[i] == '['``; return (regex, next)."""
    j = i + 1
    negated = False
    if j < len(text) and text[j] == "^":
        negated, j = True, j + 1
    items: list[str] = []  # ASCII class items (Python class syntax)
    wide: list[str] = []  # non-ASCII literals, matched as UTF-8 sequences
    first = True
    while True:
        if j >= len(text):
            raise _PatternError("unclosed character class")
        c = text[j]
        if c == "]" and not first:
            j += 1
            break
        first = False
        if c == "[":
            if text.startswith("[:", j):
                end = text.find(":]", j + 2)
                if end < 0:
                    raise _PatternError("unclosed POSIX class")
                name = text[j + 2 : end]
                if name.startswith("^") or name not in _POSIX_CLASSES:
                    raise _PatternError(f"unsupported POSIX class [:{name}:]")
                items.append(_POSIX_CLASSES[name])
                j = end + 2
                continue
            raise _PatternError("nested character classes are not supported")
        if c in "&-~" and text.startswith(c * 2, j):
            raise _PatternError("character class set operations are not supported")
        if c == "\\":
            if j + 1 >= len(text):
                raise _PatternError("trailing backslash")
            e = text[j + 1]
            if e in "xuU":
                lit, j = _hex_escape(text, j + 1)
                if lit.startswith("\\x") and len(lit) > 4:
                    raise _PatternError("non-ASCII escapes in a class are not supported")
                item = lit
            elif e in "pP":
                cls, j = _unicode_class(text, j + 1)
                if e == "P":
                    raise _PatternError("negated Unicode classes in a class are not supported")
                item = cls
            elif e.isdigit():
                raise _PatternError("octal escapes are not supported")
            elif e.isascii() and (e.isalnum() and e not in "dDwWsStnrfva"):
                raise _PatternError(f"unrecognized escape \\{e}")
            else:
                item = "\\" + e if e.isascii() else _literal(e)
                j += 2
            if item.startswith("\\x") and len(item) > 4:
                wide.append(item)
            else:
                items.append(item)
            continue
        if not c.isascii():
            if j + 1 < len(text) and text[j + 1] == "-" and text[j + 2 : j + 3] not in ("]", ""):
                raise _PatternError("non-ASCII ranges in a class are not supported")
            wide.append(_literal(c))
            j += 1
            continue
        if (
            c == "-"
            and items
            and text[j + 1 : j + 2] not in ("]", "")
            and not items[-1].endswith("-")
        ):
            nxt = text[j + 1]
            if not nxt.isascii():
                raise _PatternError("non-ASCII ranges in a class are not supported")
        # `|`, `&`, `~` are plain in Rust classes; escaped, Python never reads set syntax.
        items.append("\\" + c if c in "[]^\\|&~" else c)
        j += 1
    if wide and negated:
        raise _PatternError("negated classes with non-ASCII characters are not supported")
    if wide and icase:
        wide = [_fold(w) for w in wide]
    body = "".join(items)
    if not wide:
        if not body:
            raise _PatternError("empty character class")
        return "[" + ("^" if negated else "") + body + "]", j
    alts = ([f"[{body}]"] if body else []) + wide
    return "(?:" + "|".join(alts) + ")", j


def _fold(escaped_utf8: str) -> str:
    """Case variants of one non-ASCII literal written as ``\\xHH…`` escapes."""
    raw = bytes(int(h, 16) for h in escaped_utf8.split("\\x")[1:]).decode("utf-8")
    variants = {raw, raw.lower(), raw.upper()}
    if len(variants) == 1:
        return escaped_utf8
    return (
        "(?:"
        + "|".join(sorted(_literal(v) if len(v) == 1 else re.escape(v) for v in variants))
        + ")"
    )


def _unicode_class(text: str, i: int) -> tuple[str, int]:
    """``\\pL`` / ``\\p{Name}`` at ``text[i] in 'pP'`` → ASCII class body, next index."""
    if i + 1 >= len(text):
        raise _PatternError("incomplete Unicode class")
    if text[i + 1] == "{":
        end = text.find("}", i + 2)
        if end < 0:
            raise _PatternError("unclosed Unicode class")
        name, nxt = text[i + 2 : end].strip(), end + 1
    else:
        name, nxt = text[i + 1], i + 2
    name = name.replace(" ", "_")
    body = _UNICODE_CLASSES.get(name)
    if body is None:
        raise _PatternError(f"unsupported Unicode class \\p{{{name}}}")
    return body, nxt


def translate(pattern: str, *, icase: bool = False) -> str:
    """Rewrite one Rust-syntax regex into Python ``re`` syntax for a bytes pattern.

    Handles ``(?<name>…)``, ``\\z``, ``\\x{…}``, POSIX and simple Unicode classes,
    ``\\<``/``\\>``, inline flags anywhere (scoped until the group ends), non-ASCII
    literals (matched as UTF-8, case-folded when ``icase``). Raises ValueError for
    look-around, backreferences, class set operations and other untranslatable syntax.
    """
    try:
        return _translate(pattern, icase)
    except _PatternError as exc:
        raise ValueError(f"invalid pattern {pattern!r}: {exc}") from None


def _translate(text: str, icase: bool) -> str:
    out: list[str] = []
    # Per open group: how many scoped-flag groups opened inside it must close with it.
    pending: list[int] = [0]
    icase_stack: list[bool] = [icase]
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 >= n:
                raise _PatternError("trailing backslash")
            e = text[i + 1]
            if e in "xuU":
                lit, i = _hex_escape(text, i + 1)
                if icase_stack[-1] and lit.startswith("\\x") and len(lit) > 4:
                    lit = _fold(lit)
                out.append(lit)
                continue
            if e in "pP":
                body, i = _unicode_class(text, i + 1)
                out.append("[" + ("^" if e == "P" else "") + body + "]")
                continue
            if e.isdigit():
                raise _PatternError("backreferences are not supported")
            if e == "z":
                out.append("\\Z")
            elif e == "<":
                out.append("\\b(?=\\w)")
            elif e == ">":
                out.append("\\b(?<=\\w)")
            elif e == "n":
                raise _PatternError('the literal "\\n" is not allowed in a regex')
            elif e == "b" and text.startswith("{", i + 2):
                end = text.find("}", i + 3)
                kind = text[i + 3 : end] if end > 0 else ""
                forms = {
                    "start": "\\b(?=\\w)",
                    "end": "\\b(?<=\\w)",
                    "start-half": "(?<!\\w)",
                    "end-half": "(?!\\w)",
                }
                if kind not in forms:
                    raise _PatternError(f"unsupported word boundary \\b{{{kind}}}")
                out.append(forms[kind])
                i = end + 1
                continue
            elif e in _SIMPLE_ESCAPES:
                out.append("\\" + e)
            elif not e.isascii():
                out.append(_literal(e))
            else:
                raise _PatternError(f"unrecognized escape \\{e}")
            i += 2
            continue
        if c == "[":
            cls, i = _translate_class(text, i, icase_stack[-1])
            out.append(cls)
            continue
        if c == "(":
            if text.startswith("(?", i):
                rest = text[i + 2 :]
                if rest.startswith(("=", "!", "<=", "<!")):
                    raise _PatternError("look-around is not supported")
                if rest.startswith(("P<", "<")):
                    close = text.find(">", i)
                    if close < 0:
                        raise _PatternError("unclosed group name")
                    name = text[text.find("<", i) + 1 : close]
                    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\[\]]*", name):
                        raise _PatternError(f"invalid group name {name!r}")
                    # Names may repeat across OR-ed patterns; nothing reads groups.
                    out.append("(?:")
                    pending.append(0)
                    icase_stack.append(icase_stack[-1])
                    i = close + 1
                    continue
                if rest.startswith("P="):
                    raise _PatternError("backreferences are not supported")
                m = re.match(r"([A-Za-z-]*)([:)])", rest)
                if m is None:
                    raise _PatternError("unsupported group syntax")
                flags, kind = m.group(1), m.group(2)
                on, _, off = flags.partition("-")
                scoped_on, scoped_off = _flags(on), _flags(off)
                new_icase = icase_stack[-1]
                if "i" in on:
                    new_icase = True
                if "i" in off:
                    new_icase = False
                spec = scoped_on + ("-" + scoped_off if scoped_off else "")
                head = "(?" + spec + ":" if spec else "(?:"
                out.append(head)
                i += 2 + len(m.group(0))
                if kind == ":":
                    pending.append(0)
                    icase_stack.append(new_icase)
                else:
                    # (?flags) applies to the rest of the enclosing group: open a scoped
                    # group now, close it where the enclosing group (or pattern) ends.
                    pending[-1] += 1
                    icase_stack[-1] = new_icase
                continue
            out.append("(?:")  # nothing reads groups; avoid numbering surprises
            pending.append(0)
            icase_stack.append(icase_stack[-1])
            i += 1
            continue
        if c == ")":
            if len(pending) == 1:
                raise _PatternError("unopened group")
            out.append(")" * pending.pop() + ")")
            icase_stack.pop()
            i += 1
            continue
        if c == "{":
            m = re.match(r"\{(\d*)(,?)(\d*)\}", text[i:])
            if m is None or (not m.group(1)):
                raise _PatternError("invalid repetition")
            out.append(m.group(0))
            i += len(m.group(0))
            continue
        if not c.isascii():
            lit = _literal(c)
            out.append(_fold(lit) if icase_stack[-1] else lit)
            i += 1
            continue
        if c == "." and text[i + 1 : i + 2] not in ("*", "+", "?", "{"):
            # A lone `.` takes a whole UTF-8 character as Rust's does; repeated dots
            # stay byte-wise (fast), where only a lazy match could end mid-character.
            out.append(_ANY_CHAR)
            i += 1
            continue
        if c == "#":
            out.append("\\#")
        elif c == " ":
            out.append(" ")
        else:
            out.append(c)
        i += 1
    if len(pending) > 1:
        raise _PatternError("unclosed group")
    out.append(")" * pending[0])
    return "".join(out)


def _flags(letters: str) -> str:
    """Map Rust inline flags to Python ones; m/u/R only matter for multi-line or
    Unicode text and are dropped, U (swap greed) and x (verbose) are rejected."""
    out = ""
    for ch in letters:
        if ch in "is":
            out += ch
        elif ch in "muR":
            continue
        elif ch == "U":
            raise _PatternError("the swap-greed flag (?U) is not supported")
        elif ch == "x":
            raise _PatternError("verbose mode (?x) is not supported")
        else:
            raise _PatternError(f"unknown flag {ch!r}")
    return out


def _has_upper(pattern: str) -> bool:
    """Smart case: a literal uppercase letter, escapes such as ``\\S`` or ``\\p{Lu}`` aside."""
    stripped = re.sub(r"\\[pPxuU]\{[^}]*\}|\\[pP].|\\.", "", pattern)
    return any(ch.isupper() for ch in stripped)


def compile_patterns(patterns: list[str], case: str = "sensitive") -> re.Pattern[bytes]:
    """The OR of ``patterns`` as one bytes regex (MULTILINE, IGNORECASE per ``case``)."""
    if not patterns:
        raise ValueError("at least one pattern is required")
    if len(patterns) > MAX_PATTERNS:
        raise ValueError(f"at most {MAX_PATTERNS} patterns are allowed")
    if case not in CASE_MODES:
        raise ValueError(f"case must be one of {', '.join(CASE_MODES)}")
    for p in patterns:
        if len(p) > MAX_PATTERN_LEN:
            raise ValueError(f"invalid pattern: longer than {MAX_PATTERN_LEN} characters")
    icase = case == "insensitive" or (case == "smart" and not any(map(_has_upper, patterns)))
    parts = []
    for p in patterns:
        t = translate(p, icase=icase)
        try:
            re.compile(t.encode("utf-8"))
        except re.error as exc:
            raise ValueError(f"invalid pattern {p!r}: {exc}") from None
        except (OverflowError, RecursionError):
            raise ValueError(f"invalid pattern {p!r}: too complex") from None
        parts.append("(?:" + t + ")")
    flags = re.MULTILINE | (re.IGNORECASE if icase else 0)
    return re.compile("|".join(parts).encode("utf-8"), flags)


# ------------------------------------------------------------------------ globs


def _glob_to_regex(glob: str) -> str:
    """One gitignore-style glob body → regex over a relative path (``*`` and ``?`` stay
    within a component, ``**`` crosses them, ``{a,b}`` alternates, ``[…]`` classes)."""
    out: list[str] = []
    i, n, depth = 0, len(glob), 0
    while i < n:
        c = glob[i]
        if c == "*":
            if glob.startswith("**", i):
                before_ok = i == 0 or glob[i - 1] == "/"
                after = glob[i + 2 : i + 3]
                if before_ok and after == "/":
                    out.append("(?:.*/)?")  # `**/`: zero or more directories
                    i += 3
                    continue
                if before_ok and after == "":
                    out.append(".*")
                    i += 2
                    continue
                out.append("[^/]*")  # `**` glued to text is a plain `*`
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = glob.find("]", i + 2 if glob[i + 1 : i + 2] in ("!", "^") else i + 1)
            if end < 0:
                out.append("\\[")
            else:
                body = glob[i + 1 : end]
                neg = body[:1] in ("!", "^")
                if neg:
                    body = body[1:]
                body = body.replace("\\", "\\\\").replace("[", "\\[")
                out.append("[" + ("^/" if neg else "") + body + "]")
                i = end + 1
                continue
        elif c == "{":
            depth += 1
            out.append("(?:")
        elif c == "}" and depth:
            depth -= 1
            out.append(")")
        elif c == "," and depth:
            out.append("|")
        elif c == "\\" and i + 1 < n:
            out.append(re.escape(glob[i + 1]))
            i += 2
            continue
        else:
            out.append(re.escape(c))
        i += 1
    if depth:
        raise ValueError(f"invalid glob {glob!r}: unclosed '{{'")
    return "".join(out)


@dataclass
class _Glob:
    negated: bool
    dir_only: bool
    rx: re.Pattern[str]


@dataclass
class GlobSet:
    """ripgrep ``-g`` overrides: the last matching glob decides; ``!`` excludes; when
    any non-negated glob exists, files matching none are excluded (directories are only
    ever excluded by a negated glob, so whitelisted files deep down are still found)."""

    globs: list[_Glob] = field(default_factory=list)

    @classmethod
    def parse(cls, globs: list[str]) -> GlobSet:
        out = []
        for g in globs:
            negated = g.startswith("!")
            body = g[1:] if negated else g
            dir_only = body.endswith("/") and len(body) > 1
            body = body.rstrip("/") if dir_only else body
            if not body:
                raise ValueError(f"invalid glob {g!r}")
            anchored = "/" in body
            body = body.lstrip("/")
            rx = _glob_to_regex(body)
            if not anchored and not body.startswith("**"):
                rx = "(?:.*/)?" + rx  # no slash: matches the name at any depth
            try:
                out.append(_Glob(negated, dir_only, re.compile(rx + r"\Z", re.DOTALL)))
            except re.error as exc:
                raise ValueError(f"invalid glob {g!r}: {exc}") from None
        return cls(out)

    @property
    def has_whitelist(self) -> bool:
        return any(not g.negated for g in self.globs)

    def included(self, rel: str, is_dir: bool) -> bool:
        for g in reversed(self.globs):
            if g.dir_only and not is_dir:
                continue
            if g.rx.match(rel):
                return not g.negated
        return is_dir or not self.has_whitelist


# ------------------------------------------------------------------------ search


@dataclass
class _Search:
    rx: re.Pattern[bytes]
    before: int
    after: int
    max_count: int | None
    max_total: int
    deadline_at: float
    matches: list[dict[str, Any]] = field(default_factory=list)
    n_matches: int = 0
    budget: int = OUTPUT_BUDGET
    truncated: bool = False
    stopped: bool = False

    def timed_out(self) -> bool:
        if time.monotonic() > self.deadline_at:
            self.truncated = self.stopped = True
        return self.stopped


def _line_end(buf: Any, start: int, size: int) -> int:
    """Index of the ``\\n`` ending the line starting at ``start``, or ``size``."""
    end = buf.find(b"\n", start)
    return size if end < 0 else end


def _count_nl(buf: Any, a: int, b: int) -> int:
    if isinstance(buf, bytes):
        return buf.count(b"\n", a, b)
    n = 0
    step = 1 << 20
    while a < b:
        n += buf[a : min(b, a + step)].count(b"\n")
        a += step
    return n


def _display(path: str) -> str:
    """A path fit for JSON: names that are not UTF-8 get U+FFFD for their odd bytes."""
    if path.isascii():
        return path
    return os.fsencode(path).decode("utf-8", "replace")


def _record(
    s: _Search,
    path: str,
    buf: Any,
    size: int,
    start: int,
    lnum: int,
    kind: str,
    subs: list[dict[str, Any]],
) -> None:
    end = _line_end(buf, start, size)
    full_end = end + 1 if end < size else end
    length = full_end - start
    text = bytes(buf[start : min(full_end, start + LINE_TEXT_CAP)])
    s.budget -= len(text)
    s.matches.append(
        {
            "path": _display(path),
            "line_number": lnum,
            "absolute_offset": start,
            "line_text": text.decode("utf-8", "replace"),
            "line_bytes": length,
            "submatches": subs,
            "type": kind,
        }
    )
    if s.budget < 0:
        s.truncated = s.stopped = True


def _search_buffer(s: _Search, path: str, buf: Any, size: int) -> None:
    """Find match lines in ``buf`` and record them with their context lines."""
    rx = s.rx
    pos = 0  # where the next search starts (always a line start)
    lnum_pos, lnum = 0, 1  # line number bookkeeping: ``lnum`` is the line at lnum_pos
    emitted_end = 0  # byte just past the last recorded line (no duplicate context)
    emitted_lnum = 0  # number of the last recorded line
    after_left = 0
    in_file = 0
    checks = 0

    def line_number(at: int) -> int:
        nonlocal lnum_pos, lnum
        lnum += _count_nl(buf, lnum_pos, at)
        lnum_pos = at
        return lnum

    def flush_after(limit: int) -> None:
        """Trailing context of the previous match, up to the line starting at ``limit``."""
        nonlocal after_left, emitted_end, emitted_lnum
        while after_left > 0 and emitted_end < limit and emitted_end < size and not s.stopped:
            start = emitted_end
            _record(s, path, buf, size, start, emitted_lnum + 1, "context", [])
            emitted_lnum += 1
            emitted_end = _line_end(buf, start, size) + 1
            after_left -= 1

    while pos <= size and not s.stopped:
        m = rx.search(buf, pos)
        if m is None:
            break
        ls = buf.rfind(b"\n", 0, m.start()) + 1 if m.start() > 0 else 0
        ls = max(ls, pos)
        le = _line_end(buf, m.start(), size)
        if m.end() > le:
            # The match crossed a line end; ripgrep matches within lines only.
            m = rx.search(buf, ls, le)
            if m is None:
                pos = le + 1
                continue
        if ls == size and size > 0:
            break  # the empty "line" after a final newline is not a line
        checks += 1
        if checks % 256 == 0 and s.timed_out():
            break
        flush_after(ls)
        if s.stopped:
            break
        if s.n_matches >= s.max_total:
            # One match past the limit: the result really is incomplete.
            s.truncated = s.stopped = True
            break
        this = line_number(ls)
        if s.before and emitted_end < ls:
            first = ls
            k = 0
            while k < s.before and first > emitted_end:
                first = buf.rfind(b"\n", 0, first - 1) + 1 if first > 1 else 0
                k += 1
            first = max(first, emitted_end)
            n = this - _count_nl(buf, first, ls)
            p = first
            while p < ls:
                _record(s, path, buf, size, p, n, "context", [])
                p = _line_end(buf, p, size) + 1
                n += 1
        subs: list[dict[str, Any]] = []
        for sm in rx.finditer(buf, ls, le):
            if len(subs) >= MAX_SUBMATCHES:
                break
            a, b = sm.start(), sm.end()
            subs.append(
                {
                    "text": bytes(buf[a : min(b, a + SUBMATCH_TEXT_CAP)]).decode(
                        "utf-8", "replace"
                    ),
                    "start": a - ls,
                    "end": b - ls,
                }
            )
        _record(s, path, buf, size, ls, this, "match", subs)
        s.n_matches += 1
        in_file += 1
        emitted_end, emitted_lnum = le + 1, this
        after_left = s.after
        pos = le + 1
        if s.max_count is not None and in_file >= s.max_count:
            break
    flush_after(size)


def _search_file(s: _Search, path: str, host_path: str, size: int) -> None:
    if size == 0:
        return
    try:
        fd = os.open(host_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        try:
            buf: Any = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return
        try:
            size = len(buf)
            if buf.find(b"\0") >= 0:
                return  # binary
            _search_buffer(s, path, buf, size)
        finally:
            buf.close()
    finally:
        os.close(fd)


def _walk_files(
    stack: tuple[str, ...], display: str, globs: GlobSet
) -> Iterator[tuple[str, EntryStat]]:
    """Regular files below a directory, depth-first in name order, never following
    symlinks; ``display`` is the directory's path as reported."""
    base = display.rstrip("/")
    todo: list[tuple[str, str, Iterator[EntryStat], tuple[str, ...]]] = [
        (base, "", iter(ImageView.entries(stack)), stack)
    ]
    while todo:
        dpath, drel, entries, dstack = todo[-1]
        e = next(entries, None)
        if e is None:
            todo.pop()
            continue
        rel = drel + e.name
        full = dpath + "/" + e.name
        if e.is_dir:
            if globs.globs and not globs.included(rel, True):
                continue
            sub = lookup(dstack, e.name)
            if sub is not None:
                todo.append((full, rel + "/", iter(ImageView.entries(sub.stack)), sub.stack))
        elif e.is_regular:
            if globs.globs and not globs.included(rel, False):
                continue
            yield full, e


def _stack_of(view: ImageView, resolved: str) -> tuple[str, ...] | None:
    stack = view.root_stack
    for comp in (c for c in resolved.split("/") if c):
        hit = lookup(stack, comp)
        if hit is None or not hit.stack:
            return None
        stack = hit.stack
    return stack


def grep(
    view: ImageView,
    *,
    patterns: list[str],
    paths: list[str] | None = None,
    globs: list[str] | None = None,
    case: str = "sensitive",
    before: int = 0,
    after: int = 0,
    max_count: int | None = None,
    max_total: int = 1000,
    deadline: float = 10.0,
) -> dict[str, Any]:
    """Search ``paths`` (default ``["/"]``) of an image; return the API's GrepResult.

    ``{path, patterns, matches: [GrepMatch], truncated}`` where ``path`` is the first
    root as normalized, matches are ordered by root then walk order, context lines have
    ``type: "context"`` and no submatches, and ``truncated`` says that ``max_total``
    (one more match existed), the output budget or ``deadline`` (seconds) stopped the
    search. A path naming a file searches that file (globs do not filter explicit
    files, as in ripgrep). Raises ValueError for bad parameters or patterns and
    PathNotFound when a path does not exist.
    """
    roots = list(paths) if paths else ["/"]
    if len(roots) > MAX_PATHS:
        raise ValueError(f"at most {MAX_PATHS} paths are allowed")
    for name, value in (("before", before), ("after", after)):
        if not 0 <= value <= MAX_CONTEXT:
            raise ValueError(f"{name} must be between 0 and {MAX_CONTEXT}")
    if max_count is not None and not 1 <= max_count <= MAX_COUNT_LIMIT:
        raise ValueError(f"max_count must be between 1 and {MAX_COUNT_LIMIT}")
    if not 1 <= max_total <= MAX_COUNT_LIMIT:
        raise ValueError(f"max_total must be between 1 and {MAX_COUNT_LIMIT}")
    rx = compile_patterns(list(patterns), case)
    globset = GlobSet.parse(list(globs or []))
    # Resolve every root first: a missing one fails the request before any work.
    resolved: list[tuple[str, str, EntryStat]] = []
    for p in roots:
        display = view.normalize(p or "/", follow=False)
        target = view.stat(p or "/", follow=True)
        resolved.append((display, view.normalize(p or "/", follow=True), target))
    s = _Search(rx, before, after, max_count, max_total, time.monotonic() + deadline)
    for display, real, target in resolved:
        if s.stopped:
            break
        if target.is_regular:
            _search_file(s, display, target.host_path, target.size)
        elif target.is_dir:
            stack = _stack_of(view, real)
            if stack is None:
                continue
            for full, e in _walk_files(stack, display, globset):
                if s.timed_out():
                    break
                _search_file(s, full, e.host_path, e.size)
                if s.stopped:
                    break
    return {
        "path": _display(resolved[0][0]),
        "patterns": list(patterns),
        "matches": s.matches,
        "truncated": s.truncated,
    }
