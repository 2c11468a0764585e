"""Sizes as people read them, in one unit system everywhere the project prints a size:
decimal (1 MB = 10**6 bytes, the unit of the ``_summary/`` metrics and the sweep report)."""

from __future__ import annotations


def human_bytes(n: float, digits: int = 1) -> str:
    """``11.6 MB``: bytes in B / kB / MB / GB / TB (powers of 1000)."""
    power = next((p for p in (0, 1, 2, 3) if abs(n) < 1000 ** (p + 1)), 4)
    if not power:
        return f"{n:.0f} B"
    return f"{n / 1000**power:.{digits}f} {('kB', 'MB', 'GB', 'TB')[power - 1]}"
