"""Property test: a KV cache with a slot dim (a batched decode step's), written at
per-slot positions (`cache[slots, :, pos] = k`) and read back by masked attention, for
random batch sizes, shapes, positions, worker counts, tile sizes, key chunks and
policies. Every schedule must verify, and the interpreter must agree with eager PyTorch
over two steps (the second reads what the first wrote)."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tilec.api as tilec_api


class SlotCache(nn.Module):
    """One attention layer over a [batch, heads, seq, dim] cache. `row_group`: the key
    is rotated by a concat of its halves (as RoPE is), so its append leaves the matmul
    epilogue for a row group."""

    def __init__(self, batch, heads, seq, dim, row_group, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.shape = batch, heads, dim
        self.row_group = row_group
        self.k = nn.Linear(heads * dim, heads * dim)
        self.q = nn.Linear(heads * dim, heads * dim)
        self.register_buffer("cache", torch.zeros(batch, heads, seq, dim))
        self.register_buffer("slots", torch.arange(batch))
        self.register_buffer("positions", torch.arange(seq))

    def forward(self, x, pos):
        batch, heads, dim = self.shape
        k = self.k(x).view(batch, heads, dim)
        if self.row_group:
            k = torch.cat([k[..., dim // 2:], k[..., :dim // 2]], dim=-1) * 0.5 + k
        self.cache[self.slots, :, pos] = k
        q = self.q(x).view(batch, heads, 1, dim)
        scores = (q @ self.cache.transpose(-2, -1)) * dim ** -0.5
        scores = scores.masked_fill(self.positions > pos.view(-1, 1, 1, 1), float("-inf"))
        out = torch.softmax(scores, dim=-1) @ self.cache
        return out.reshape(batch, heads * dim)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 5), heads=st.integers(1, 3), seq=st.sampled_from([16, 40]),
       dim=st.sampled_from([8, 16]), row_group=st.booleans(), workers=st.integers(1, 5),
       tile=st.sampled_from([(16, 16, 16), (4, 8, 8), (2, 64, 32)]),
       kv_chunk=st.sampled_from([None, 16]),
       policy=st.sampled_from(["critical_path", "round_robin"]), seed=st.integers(0, 1000))
def test_slot_cache_matches_eager(batch, heads, seq, dim, row_group, workers, tile, kv_chunk,
                                  policy, seed):
    g = torch.Generator().manual_seed(seed)

    def inputs():
        return torch.randn(batch, heads * dim, generator=g), torch.randint(0, seq, (batch,), generator=g)

    model = SlotCache(batch, heads, seq, dim, row_group, seed).eval()
    engine = tilec_api.compile(model, inputs(), workers=workers, tile_m=tile[0],
                               tile_n=tile[1], tile_k=tile[2], kv_chunk=kv_chunk, policy=policy)
    report = engine.verify()
    assert report.ok, report.violations[:1]
    model.cache.zero_()   # (the export traced a step)
    ex = engine.new_executor("interpret", "random", seed)
    for _ in range(2):
        x, pos = inputs()
        with torch.no_grad():
            want = model(x, pos)
        (got,) = ex.run({"x": x, "pos": pos}).values()
        err = (got - want).abs().max().item()
        assert err <= 1e-4, f"error {err:.2e} at positions {pos.tolist()}"
