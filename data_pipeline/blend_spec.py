"""The one parser of a `data.blend` entry ("WEIGHT PATH"), shared by the config check, the
launcher's dataset check and the loader. Pure Python (no numpy), so the config can use it
before anything heavy is imported."""

from __future__ import annotations

import math

EXAMPLE = "e.g. '0.3 data/code'"


def parse_blend_entry(entry: str) -> tuple[float, str]:
    """(weight, path) of one entry; ValueError naming the fix when it is not a positive
    number followed by a path (the path may contain spaces)."""
    parts = str(entry).split(maxsplit=1)
    if len(parts) != 2:
        raise ValueError(f"use 'WEIGHT PATH' with a positive weight, {EXAMPLE}")
    try:
        weight = float(parts[0])
    except ValueError:
        weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(
            f"the weight must be a positive number: use 'WEIGHT PATH' with a positive weight, "
            f"{EXAMPLE}"
        )
    return weight, parts[1].strip()
