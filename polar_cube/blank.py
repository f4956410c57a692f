"""Blocks known to hold no data: an all-NaN float32 block as a read-only broadcast view of
one NaN, which takes no memory and is recognised without scanning it. The resampler hands one
out for a chunk its source does not reach (e.g. the 880 chunks of eight small lake masks on
the 100 m grid); the statistics, the overview levels and the writer then skip it at once,
instead of filling, scanning and halving 16 MB of NaN per chunk. Any other all-NaN block
still gives the same results, only slower."""

from __future__ import annotations

import numpy as np


def blank(shape: tuple[int, ...]) -> np.ndarray:
    """An all-NaN float32 block of `shape` that takes no memory (read-only)."""
    return np.broadcast_to(np.float32(np.nan), shape)


def is_blank(block: np.ndarray) -> bool:
    """Whether `block` is (a view of) a `blank`: every stride 0, its one value NaN."""
    return block.size > 0 and not any(block.strides) and bool(np.isnan(block.flat[0]))
