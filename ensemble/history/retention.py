"""Which tether generations a history keeps: all | every:K | last:N."""

from __future__ import annotations


def parse_retention(spec: str) -> tuple[str, int]:
    """'all' | 'every:K' | 'last:N' -> (kind, number). Raises ValueError naming the spec."""
    if spec == "all":
        return "all", 0
    kind, _, num = spec.partition(":")
    if kind in ("every", "last") and num.isdigit() and int(num) >= 1:
        return kind, int(num)
    raise ValueError(f"retention {spec!r}: expected 'all', 'every:K' or 'last:N' (K, N >= 1)")


def dropped_by_retention(kind: str, n: int, new_generation: int) -> int | None:
    """Which older generation to delete once `new_generation` is written, if any.

    every:K keeps multiples of K (and always the latest); last:N keeps the newest N.
    """
    if kind == "every":
        prev = new_generation - 1
        return prev if prev >= 0 and prev % n != 0 else None
    if kind == "last":
        old = new_generation - n
        return old if old >= 0 else None
    return None
