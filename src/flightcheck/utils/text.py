"""Tables as text: markdown for TensorBoard and files, aligned columns for the console."""

from __future__ import annotations

from collections.abc import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool = False) -> str:
    """A table of strings: GitHub markdown, or columns aligned with spaces.

    Example::

        print(table(["check", "step"], [["loss_spike", "120"]]))
    """
    if markdown:
        def cell(x: str) -> str:
            return str(x).replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)
    # The last column (usually a message) is not padded, so long text does not widen the rest.
    widths = [max([len(str(h))] + [len(str(r[i])) for r in rows]) for i, h in enumerate(headers)]
    def line(cells: Sequence[str]) -> str:
        padded = [str(c).ljust(w) for c, w in zip(cells[:-1], widths[:-1])] + [str(cells[-1])]
        return "  ".join(padded).rstrip()
    rule = ["-" * w for w in widths[:-1]] + ["-" * len(str(headers[-1]))]
    return "\n".join([line(headers), line(rule)] + [line(r) for r in rows])


__all__ = ["table"]
