"""The region a state update in a matmul epilogue writes (passes/tile.py: space_box): a
tile of rows [r0, r1) x cols [c0, c1) of the product, seen in the appended value's own
shape. It must hold every element the tile writes (else a race the verifier cannot see),
and a batch's column tiles must write apart (else every v projection tile of a layer
waits for the one before: batch 8 of Llama-3.2-1B chained 30 of them per layer)."""
from __future__ import annotations

import itertools
import math

import pytest

from tilec.passes.tile import space_box


def _coords(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for n in reversed(shape):
        out.append(flat % n)
        flat //= n
    return tuple(reversed(out))


@pytest.mark.parametrize("shape,space", [
    ((4, 2, 1, 16), 32),    # a batch of 4: [B, kv heads, 1, head dim] as [B, heads x dim]
    ((3, 4, 1, 4), 16),
    ((2, 3, 4), 12),
    ((6, 4), 8),            # two rows of the value per row of the product: a flat range
    ((3, 5), 5),
])
def test_the_box_holds_every_element_the_tile_writes(shape, space):
    rows = math.prod(shape) // space
    for r0, r1 in itertools.combinations(range(rows + 1), 2):
        for c0, c1 in itertools.combinations(range(space + 1), 2):
            box = space_box(shape, space, r0, r1, c0, c1)
            assert len(box) == len(shape)
            for r in range(r0, r1):
                for c in range(c0, c1):
                    at = _coords(r * space + c, shape)
                    assert all(a <= x < b for x, (a, b) in zip(at, box)), (r, c, box)


def test_column_tiles_of_a_batch_write_apart():
    """16-column tiles of a batch-4 append of 2 heads of 16: each writes its own head."""
    boxes = [space_box((4, 2, 1, 16), 32, 0, 4, c, c + 16) for c in (0, 16)]
    assert boxes == [((0, 4), (0, 1), (0, 1), (0, 16)), ((0, 4), (1, 2), (0, 1), (0, 16))]


def test_a_batch_engines_v_tiles_write_their_own_heads():
    """llama_tiny at batch 4 on h200: the v projection's tiles, which append to the
    cache in their epilogue, each write their own columns of every layer's cache, so no
    tile of a layer waits for another (they used to write the whole cache each)."""
    import dataclasses
    from pathlib import Path

    import tilec.api
    from tilec.compiler.config import NO_PREFILL, load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples/llama_tiny.yaml")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, batch=4,
                                                             prefill=NO_PREFILL))
    engine = tilec.api.compile(cfg, target="h200", workers=8, dtype="bfloat16", aot=False)
    tg = engine.data.manifest.schedule.taskgraph
    by_buffer: dict[str, list] = {}
    for task in tg.tasks:
        if task.group.endswith("_append"):
            for region in task.writes:
                by_buffer.setdefault(region.buffer, []).append(region.box)
    assert by_buffer and any(len(boxes) > 1 for boxes in by_buffer.values())
    for buffer, boxes in by_buffer.items():
        for a, b in itertools.combinations(boxes, 2):
            assert any(x1 <= y0 or y1 <= x0 for (x0, x1), (y0, y1) in zip(a, b)), (buffer, a, b)
