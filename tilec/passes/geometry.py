"""Boxes: how a tile of a strided view maps onto the buffer it reads.

Regions are boxes in a buffer's own shape, so dependencies come from box
intersection. A view box maps exactly when every view dim walks inside one buffer dim
(permutes, slices, head splits, broadcasts); otherwise the bounding box of the flat
range is used, which may only add dependencies, never lose one.
"""
from __future__ import annotations

import math

import numpy as np

from tilec.ir.graph import Operand, contiguous_strides

Box = tuple[tuple[int, int], ...]


def box_array(regions) -> np.ndarray:
    """The boxes of regions (all of one buffer) as an int64 array [regions, dims, 2]."""
    return np.array([r.box for r in regions], dtype=np.int64).reshape(len(regions), -1, 2)


def overlap_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)]: whether box i of `a` and box j of `b` (box_array) intersect.
    One 2-D test per dim: a 3-D one and its reduction took twice as long (kept for
    boxes of different dims, which only a malformed region has: numpy broadcasts)."""
    if a.shape[1] != b.shape[1]:
        return np.all((a[:, None, :, 0] < b[None, :, :, 1]) &
                      (b[None, :, :, 0] < a[:, None, :, 1]), axis=2)
    out = np.ones((len(a), len(b)), dtype=bool)
    for d in range(a.shape[1]):
        out &= a[:, None, d, 0] < b[None, :, d, 1]
        out &= b[None, :, d, 0] < a[:, None, d, 1]
    return out


def range_to_box(lo: int, hi: int, shape: tuple[int, ...]) -> Box:
    """Bounding box of the flat element range [lo, hi] (inclusive) of a contiguous
    tensor of `shape`."""
    box = []
    fixed = True  # all outer coordinates of lo and hi agree so far
    for j, size in enumerate(shape):
        inner = math.prod(shape[j + 1:])
        if fixed:
            a, b = (lo // inner) % size, (hi // inner) % size
            if (hi // inner) - (lo // inner) >= size:  # wraps: cannot happen when fixed
                a, b = 0, size - 1
            box.append((a, b + 1))
            fixed = a == b
        else:
            box.append((0, size))
    return tuple(box)


def rows_box(shape: tuple[int, ...], r0: int, r1: int, c0: int, c1: int) -> Box:
    """Box of rows [r0, r1) and columns [c0, c1) of `shape` viewed as [rows, cols]."""
    if not shape:
        return ()
    lead = shape[:-1]
    if lead:
        rb = range_to_box(r0, r1 - 1, lead)
    else:
        rb = ()
    return rb + ((c0, c1),)


def view_region(operand: Operand, box: Box, buffer_shape: tuple[int, ...]) -> Box | None:
    """The buffer box that elements `box` of the view `operand` touch (None if empty)."""
    if any(b <= a for a, b in box):
        return None
    if not buffer_shape:
        return ()
    bstrides = contiguous_strides(buffer_shape)
    # base coordinates of the view's offset
    base = [(operand.offset // s) % n for s, n in zip(bstrides, buffer_shape)]
    lo = list(base)
    hi = list(base)
    exact = True
    for (a, b), size, stride in zip(box, operand.shape, operand.strides):
        if stride == 0 or b - a <= 0:
            continue
        j = next((j for j, s in enumerate(bstrides) if s <= stride), None)
        if j is None or stride % bstrides[j]:
            exact = False
            break
        m = stride // bstrides[j]
        lo[j] += a * m
        hi[j] += (b - 1) * m
    if exact and all(h < n for h, n in zip(hi, buffer_shape)):
        return tuple((l, h + 1) for l, h in zip(lo, hi))
    flat_lo = operand.offset + sum(a * s for (a, _), s in zip(box, operand.strides))
    flat_hi = operand.offset + sum((b - 1) * s for (_, b), s in zip(box, operand.strides))
    return range_to_box(flat_lo, flat_hi, buffer_shape)


def operand_rows_box(operand: Operand, r0: int, r1: int, c0: int, c1: int) -> Box:
    """The view box of rows [r0, r1) x cols [c0, c1) of an operand read row-wise."""
    return rows_box(operand.shape, r0, r1, c0, c1)
