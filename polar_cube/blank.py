"""Blocks of one value throughout, made without memory: a read-only broadcast view of the
value, recognised without scanning it. The resampler hands out an all-NaN one (a `blank`)
for a chunk its source does not reach (e.g. 880 chunks of eight small lake masks on the
100 m grid), the rasteriser a background-only one for a chunk no polygon touches; the
statistics, the overview levels and the writer then take each in a moment instead of
filling, scanning, halving and compressing 16 MB per chunk. Any other block of one value
gives the same results, only slower."""

from __future__ import annotations

import numpy as np


def constant(shape: tuple[int, ...], value: float) -> np.ndarray:
    """A float32 block of `shape` holding `value` everywhere, taking no memory (read-only)."""
    return np.broadcast_to(np.float32(value), shape)


def blank(shape: tuple[int, ...]) -> np.ndarray:
    """An all-NaN float32 block of `shape` that takes no memory (read-only)."""
    return constant(shape, np.nan)


def constant_value(block: np.ndarray) -> float | None:
    """The value of a `constant` block (or a view of one), None for any other block."""
    if block.size == 0 or any(block.strides):
        return None
    return float(block.flat[0])


def is_blank(block: np.ndarray) -> bool:
    """Whether `block` is (a view of) a `blank`."""
    value = constant_value(block)
    return value is not None and np.isnan(value)
