"""Row formatters: ``default``/``table``, ``json`` (JSONL), ``json-pretty``,
``csv``, ``tsv`` and ``plain``. Pure: they turn rows into text and notices; the
Output object decides where the text goes.

A formatter is streaming: :meth:`Formatter.add` buffers rows, :meth:`flush`
renders them, :meth:`close` ends the stream. The column layout is fixed at the
first flush so paginated output stays aligned. Column order: ``head`` columns,
then keys in discovery order, then ``tail`` columns.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

from contree_shell.output.color import STATUS_STYLES, paint, strip_ansi
from contree_shell.output.fields import Style, convert
from contree_shell.output.text import display_width, pad, truncate

__all__ = [
    "FORMATS",
    "CsvFormatter",
    "Formatter",
    "JsonFormatter",
    "JsonPrettyFormatter",
    "PlainFormatter",
    "TableFormatter",
    "TsvFormatter",
    "UnknownFormat",
    "fit_columns",
    "get_formatter",
    "render",
]

Row = Mapping[str, Any]
SEP = "  "
HID_NOTICE = "Hid {names} to fit terminal; use --format json to see everything"
TRUNCATED_NOTICE = "Output truncated to fit terminal; use --format json to see full values"


class UnknownFormat(ValueError):
    """An ``-o`` value that names no formatter."""

    def __init__(self, name: str) -> None:
        self.message = f"Unknown format '{name}'. Available: {', '.join(FORMATS)}"
        super().__init__(self.message)


def _order_columns(rows: Sequence[Row], head: Sequence[str], tail: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    middle = [k for k in seen if k not in head and k not in tail]
    return [h for h in head if h in seen] + middle + [t for t in tail if t in seen]


class Formatter:
    """Base class: buffering and column discovery."""

    name: ClassVar[str] = ""
    style: ClassVar[Style] = "text"

    def __init__(
        self,
        *,
        head: Sequence[str] = (),
        tail: Sequence[str] = (),
        tty: bool = False,
        width: int | None = None,
        color: bool = False,
        now: datetime | None = None,
    ) -> None:
        self.head = list(head)
        self.tail = list(tail)
        self.tty = tty
        self.width = width
        self.color = color
        self.now = now
        self.notices: list[str] = []
        self.columns: list[str] | None = None  # fixed at the first non-empty flush
        self.rows_written = 0
        self._buffer: list[Row] = []

    def add(self, rows: Iterable[Row]) -> None:
        """Buffer rows until the next :meth:`flush`."""
        self._buffer.extend(rows)

    def flush(self) -> str:
        """Render the buffered rows."""
        rows, self._buffer = self._buffer, []
        if not rows:
            return ""
        if self.columns is None:
            self.columns = self._choose_columns(rows)
        text = self._render(rows)
        self.rows_written += len(rows)
        return text

    def close(self) -> str:
        """Flush and end the stream."""
        return self.flush()

    def take_notices(self) -> list[str]:
        """Notices produced so far (for stderr), cleared."""
        out, self.notices = self.notices, []
        return out

    def _choose_columns(self, rows: Sequence[Row]) -> list[str]:
        return _order_columns(rows, self.head, self.tail)

    def _render(self, rows: Sequence[Row]) -> str:
        raise NotImplementedError

    def _cell(self, key: str, value: Any) -> str:
        return str(convert(key, value, self.style, now=self.now))


# ---------------------------------------------------------------------------
# table


def fit_columns(
    columns: Sequence[str],
    widths: Sequence[int],
    limit: int,
    *,
    required: Iterable[str] = (),
    tail: Iterable[str] = (),
    min_width: int = 8,
) -> tuple[list[str], list[int], list[str]]:
    """Choose visible columns and their widths so a table fits ``limit`` cells.

    1. Hide optional columns (neither ``required`` nor ``tail``), the latest
       discovered first, while even their comfortable widths
       (``min(natural, min_width)``) would not fit.
    2. Shrink non-tail columns, widest first, down to their comfortable width.
    3. Shrink every column down to its comfortable width, then down to 1.

    Returns (visible columns, their widths, hidden columns).
    """
    keep = set(required) | set(tail)
    tail_set = set(tail)
    cols = list(columns)
    ws = list(widths)
    hidden: list[str] = []

    def total(values: Sequence[int]) -> int:
        return sum(values) + len(SEP) * max(len(values) - 1, 0)

    i = len(cols) - 1
    while total([min(w, min_width) for w in ws]) > limit and i >= 0:
        if cols[i] not in keep and len(cols) > 1:
            hidden.insert(0, cols.pop(i))
            ws.pop(i)
        i -= 1

    comfortable = [min(w, min_width) for w in ws]
    phases = (
        [(j, comfortable[j]) for j, c in enumerate(cols) if c not in tail_set],
        [(j, comfortable[j]) for j in range(len(cols))],
        [(j, 1) for j in range(len(cols))],
    )
    for phase in phases:
        floors = dict(phase)
        excess = total(ws) - limit
        while excess > 0:
            candidates = [j for j in floors if ws[j] > floors[j]]
            if not candidates:
                break
            widest = max(candidates, key=lambda j: (ws[j], j))
            runner_up = max((ws[j] for j in candidates if j != widest), default=0)
            step = min(excess, ws[widest] - max(floors[widest], runner_up))
            ws[widest] -= max(step, 1)
            excess = total(ws) - limit
        if excess <= 0:
            break
    return cols, ws, hidden


class TableFormatter(Formatter):
    """Aligned columns with upper-case headers; fits the terminal on a TTY."""

    name = "table"
    style: ClassVar[Style] = "display"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._widths: list[int] = []
        self._numeric: set[str] = set()

    def _choose_columns(self, rows: Sequence[Row]) -> list[str]:
        cols = _order_columns(rows, self.head, self.tail)
        # Nested values do not fit in a cell: leave them to the machine formats
        # unless the caller named the column.
        named = set(self.head) | set(self.tail)
        return [
            c
            for c in cols
            if c in named
            or not all(isinstance(r.get(c), dict | list) or r.get(c) is None for r in rows)
        ]

    def _cell(self, key: str, value: Any) -> str:
        text = strip_ansi(super()._cell(key, value))
        if "\n" in text or "\t" in text or "\r" in text:
            text = " ".join(text.split())
        return text

    def _render(self, rows: Sequence[Row]) -> str:
        assert self.columns is not None
        first = not self._widths
        cells = [[self._cell(c, r.get(c)) for c in self.columns] for r in rows]
        if first:
            natural = [
                max([display_width(c)] + [display_width(row[i]) for row in cells])
                for i, c in enumerate(self.columns)
            ]
            self._numeric = {
                c
                for c in self.columns
                if any(r.get(c) is not None for r in rows)
                and all(
                    r.get(c) is None
                    or (isinstance(r.get(c), int | float) and not isinstance(r.get(c), bool))
                    for r in rows
                )
            }
            if self.tty and self.width:
                visible, widths, hidden = fit_columns(
                    self.columns, natural, self.width, required=self.head, tail=self.tail
                )
                if hidden:
                    self.notices.append(HID_NOTICE.format(names=", ".join(hidden)))
                keep = [self.columns.index(c) for c in visible]
                self.columns = visible
                cells = [[row[i] for i in keep] for row in cells]
                self._widths = widths
            else:
                self._widths = natural
        lines: list[str] = []
        if first:
            lines.append(self._line([c.upper() for c in self.columns], header=True))
        cut = False
        for row in cells:
            if self.tty:
                fitted = [truncate(v, w) for v, w in zip(row, self._widths, strict=True)]
                cut = cut or fitted != row
                row = fitted
            lines.append(self._line(row))
        if cut and TRUNCATED_NOTICE not in self.notices:
            self.notices.append(TRUNCATED_NOTICE)
        return "".join(line + "\n" for line in lines)

    def _line(self, values: Sequence[str], *, header: bool = False) -> str:
        assert self.columns is not None
        parts: list[str] = []
        last = len(values) - 1
        for i, (col, value, width) in enumerate(
            zip(self.columns, values, self._widths, strict=True)
        ):
            text = value
            if header:
                text = paint(text, "bold", enabled=self.color)
            elif col == "status" and value in STATUS_STYLES:
                text = paint(text, *STATUS_STYLES[value], enabled=self.color)
            right = col in self._numeric
            if i == last and not right:
                parts.append(text)  # no trailing spaces
            else:
                parts.append(pad(text, width, right=right))
        return SEP.join(parts).rstrip(" ") if not self.color else SEP.join(parts)


# ---------------------------------------------------------------------------
# csv / tsv


class CsvFormatter(Formatter):
    """Header once, then one record per row; nested values as JSON strings."""

    name = "csv"
    delimiter = ","

    def _render(self, rows: Sequence[Row]) -> str:
        assert self.columns is not None
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter=self.delimiter, lineterminator="\n")
        if self.rows_written == 0:
            writer.writerow(self.columns)
        for row in rows:
            writer.writerow([self._cell(c, row.get(c)) for c in self.columns])
        return buf.getvalue()


class TsvFormatter(CsvFormatter):
    """Tab-separated; fields containing tabs, newlines or quotes are quoted."""

    name = "tsv"
    delimiter = "\t"


# ---------------------------------------------------------------------------
# json


def _json_row(fmt: Formatter, row: Row) -> dict[str, Any]:
    return {k: convert(k, v, "json") for k, v in row.items()}


def _dumps(value: Any, **kw: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, **kw)


class JsonFormatter(Formatter):
    """JSON Lines: one object per row, nested values kept."""

    name = "json"
    style: ClassVar[Style] = "json"

    def _choose_columns(self, rows: Sequence[Row]) -> list[str]:
        return []

    def _render(self, rows: Sequence[Row]) -> str:
        return "".join(_dumps(_json_row(self, r)) + "\n" for r in rows)


class JsonPrettyFormatter(Formatter):
    """One JSON array, streamed: opened at the first flush, closed by close()."""

    name = "json-pretty"
    style: ClassVar[Style] = "json"

    def _choose_columns(self, rows: Sequence[Row]) -> list[str]:
        return []

    def _render(self, rows: Sequence[Row]) -> str:
        items = ["  " + _dumps(_json_row(self, r), indent=2).replace("\n", "\n  ") for r in rows]
        prefix = "[\n" if self.rows_written == 0 else ",\n"
        return prefix + ",\n".join(items)

    def close(self) -> str:
        text = self.flush()
        return text + ("\n]\n" if self.rows_written else "[]\n")


# ---------------------------------------------------------------------------
# plain


class PlainFormatter(Formatter):
    """``key: value`` blocks separated by ``---``; multi-line values indented."""

    name = "plain"

    def _render(self, rows: Sequence[Row]) -> str:
        blocks: list[str] = []
        for row in rows:
            lines = []
            for key in _order_columns([row], self.head, self.tail):
                value = strip_ansi(self._cell(key, row.get(key)))
                if "\n" in value:
                    value = value.rstrip("\n").replace("\n", "\n  ")
                lines.append(f"{key}: {value}" if value else f"{key}:")
            blocks.append("\n".join(lines) + "\n")
        text = "---\n".join(blocks)
        return ("---\n" + text) if self.rows_written else text


FORMATS: dict[str, type[Formatter]] = {
    "default": TableFormatter,
    "table": TableFormatter,
    "json": JsonFormatter,
    "json-pretty": JsonPrettyFormatter,
    "csv": CsvFormatter,
    "tsv": TsvFormatter,
    "plain": PlainFormatter,
}


def get_formatter(name: str, **kw: Any) -> Formatter:
    """A new formatter by ``-o`` name (UnknownFormat if there is none)."""
    try:
        cls = FORMATS[name]
    except KeyError:
        raise UnknownFormat(name) from None
    return cls(**kw)


def render(
    rows: Iterable[Row],
    fmt: str = "default",
    *,
    head: Sequence[str] = (),
    tail: Sequence[str] = (),
    tty: bool = False,
    width: int | None = None,
    color: bool = False,
    now: datetime | None = None,
) -> tuple[str, list[str]]:
    """Render rows in one go: (text, notices)."""
    formatter = get_formatter(fmt, head=head, tail=tail, tty=tty, width=width, color=color, now=now)
    formatter.add(rows)
    text = formatter.close()
    return text, formatter.take_notices()
