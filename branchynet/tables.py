"""The one markdown table writer (the CLI's Table I and bench table, the selftest table,
the benchmark report). Plain Python: a table is too small a job for a dependency."""

from __future__ import annotations

from typing import Sequence

__all__ = ["markdown_table"]


def markdown_table(head: Sequence, rows: Sequence[Sequence], *, pad: bool = True) -> str:
    """A GitHub-flavoured markdown table, one line per row, no trailing newline.

    Args:
        head: the column names; cells of any type are written with ``str``.
        rows: the body, one sequence of cells per row.
        pad: pad every cell to its column's widest, so the table also reads as plain
            text (the rule is then dashes across each column); else cells as they are
            and a ``---`` rule (a long report stays small).
    """
    head = [str(c) for c in head]
    rows = [[str(c) for c in r] for r in rows]
    if pad:
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        rule = ["-" * (w + 2) for w in widths]
        rows = [[c.ljust(w) for c, w in zip(r, widths)] for r in [head, *rows]]
    else:
        rule = [" --- "] * len(head)
        rows = [head, *rows]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join([lines[0], "|" + "|".join(rule) + "|", *lines[1:]])
