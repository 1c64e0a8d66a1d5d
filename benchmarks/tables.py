"""The two table formats every benchmark prints: aligned plain text for the terminal and Markdown for
the README (perf.py --markdown). Rows are lists of cells; a cell is printed with str()."""
from __future__ import annotations


def text(header: list, rows: list[list]) -> str:
    """Aligned plain-text table: header, dashes, rows."""
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in [header, ["-" * w for w in widths]] + rows)


def markdown(header: list, rows: list[list]) -> str:
    """Markdown table; a ratio cell such as "1.50x" is written with the multiplication sign (1.50×)."""
    return "\n".join("| " + " | ".join(str(c).replace("x", "×") if str(c).endswith("x") else str(c) for c in r) + " |"
                     for r in [header, ["---"] * len(header)] + rows)
