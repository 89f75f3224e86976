"""Pieces shared by the benchmark scripts: the photo aspect-ratio mix, the CPU name, plain-text tables."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

# (label, width : height, relative weight). Landscape 3:2 / 4:3 dominate camera output; phone portraits
# and video frames come next; the last four are the odd ones (cinema, panorama, social-media crops).
ASPECTS: tuple[tuple[str, float, float], ...] = (
    ("3:2", 3 / 2, 3.0),
    ("4:3", 4 / 3, 3.0),
    ("5:4", 5 / 4, 0.5),
    ("16:9", 16 / 9, 2.0),
    ("16:10", 16 / 10, 0.5),
    ("1:1", 1.0, 1.0),
    ("2:3", 2 / 3, 1.5),
    ("3:4", 3 / 4, 1.5),
    ("9:16", 9 / 16, 1.0),
    ("21:9", 21 / 9, 0.25),
    ("3:1", 3.0, 0.1),
    ("4:5", 4 / 5, 0.5),
    ("1.91:1", 1.91, 0.25),
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line([str(c) for c in r]) for r in rows)])
