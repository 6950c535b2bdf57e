"""One tiny model per supported op: compiled, run on both CPU backends (the generated
kernel in Triton's interpreter, and the torch reference executor) and compared with
eager PyTorch in float32 on fresh random inputs."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import tilec.api
from tilec.errors import UnsupportedOpError

REL_TOL = 1e-4


class Fn(nn.Module):
    """forward(x[, y]) = fn(x[, y]); the input names are x and y."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, y):
        return self.fn(x, y)


class Unary(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Embed(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)

    def forward(self, idx):
        return self.emb(idx)


class EmbedThenScale(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)

    def forward(self, idx, x):
        return self.emb(idx) * x


class WithConstant(nn.Module):
    """forward(x) = fn(x, c): a 0-d (or any) tensor held as a buffer or a parameter."""

    def __init__(self, fn, c: torch.Tensor, parameter: bool = False):
        super().__init__()
        self.fn = fn
        if parameter:
            self.c = nn.Parameter(c)
        else:
            self.register_buffer("c", c)

    def forward(self, x):
        return self.fn(x, self.c)


class Attention(nn.Module):
    """F.scaled_dot_product_attention as torch decomposes it (no fused kernel)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.kwargs)


class MaskedAttention(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MaskedFill(nn.Module):
    def forward(self, x, mask):
        return x.masked_fill(mask, float("-inf")).softmax(-1)


def randn(*shape, seed: int):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def positive(*shape, seed: int):
    return randn(*shape, seed=seed).abs() + 0.5


def X(*shape, pos=False):
    return lambda seed: (positive if pos else randn)(*shape, seed=seed)


def Mask(*shape):
    """A bool input, about half True."""
    return lambda seed: randn(*shape, seed=seed) > 0


def QKV(**kwargs):
    return lambda: Attention(**kwargs), {n: X(1, 2, 4, 8) for n in ("q", "k", "v")}


def U(fn, *shape, pos=False):
    return lambda: Unary(fn), {"x": X(*shape, pos=pos)}


def B(fn, xshape, yshape, ypos=False):
    return lambda: Fn(fn), {"x": X(*xshape), "y": X(*yshape, pos=ypos)}


# name -> (module factory, {input name: factory(seed) -> tensor}), inputs in forward's order
CASES = {
    # matmul
    "mm": B(torch.mm, (4, 32), (32, 16)),
    "addmm_linear_bias": (lambda: nn.Linear(32, 16), {"input": X(4, 32)}),
    "linear_no_bias": (lambda: nn.Linear(32, 16, bias=False), {"input": X(4, 32)}),
    "linear_3d_input": (lambda: nn.Linear(32, 16), {"input": X(2, 4, 32)}),
    "bmm": B(torch.bmm, (2, 4, 32), (2, 32, 8)),
    "matmul_3d": B(torch.matmul, (2, 4, 32), (2, 32, 8)),
    "matmul_3d_by_2d": B(torch.matmul, (2, 4, 32), (32, 8)),
    # binary elementwise
    "add_tensor": B(torch.add, (4, 32), (4, 32)),
    "add_broadcast_row": B(torch.add, (4, 32), (32,)),
    "add_broadcast_col": B(torch.add, (4, 32), (4, 1)),
    "add_alpha": B(lambda x, y: torch.add(x, y, alpha=2.5), (4, 32), (4, 32)),
    "sub_tensor": B(torch.sub, (4, 32), (4, 32)),
    "sub_broadcast": B(torch.sub, (2, 4, 32), (4, 32)),
    "mul_tensor": B(torch.mul, (4, 32), (4, 32)),
    "mul_broadcast": B(torch.mul, (4, 32), (1, 32)),
    "div_tensor": B(torch.div, (4, 32), (4, 32), ypos=True),
    "div_broadcast": B(torch.div, (4, 32), (4, 1), ypos=True),
    "add_scalar": U(lambda x: x + 1.5, 4, 32),
    "radd_scalar": U(lambda x: 1.5 + x, 4, 32),
    "sub_scalar": U(lambda x: x - 0.75, 4, 32),
    "rsub_scalar": U(lambda x: 0.75 - x, 4, 32),
    "mul_scalar": U(lambda x: x * 3.0, 4, 32),
    "mul_int_scalar": U(lambda x: x * 3, 4, 32),
    "div_scalar": U(lambda x: x / 7.0, 4, 32),
    "rdiv_scalar": U(lambda x: 2.0 / x, 4, 32, pos=True),
    # unary elementwise
    "neg": U(torch.neg, 4, 32),
    "exp": U(torch.exp, 4, 32),
    "log": U(torch.log, 4, 32, pos=True),
    "sqrt": U(torch.sqrt, 4, 32, pos=True),
    "rsqrt": U(torch.rsqrt, 4, 32, pos=True),
    "pow_2": U(lambda x: x.pow(2), 4, 32),
    "pow_3": U(lambda x: x ** 3, 4, 32),
    "pow_half": U(lambda x: x ** 0.5, 4, 32, pos=True),
    "pow_minus_1": U(lambda x: x.pow(-1), 4, 32, pos=True),
    "relu": U(torch.relu, 4, 32),
    "gelu_erf": U(F.gelu, 4, 32),
    "gelu_tanh": U(lambda x: F.gelu(x, approximate="tanh"), 4, 32),
    "silu": U(F.silu, 4, 32),
    "sigmoid": U(torch.sigmoid, 4, 32),
    "tanh": U(torch.tanh, 4, 32),
    # reductions over the last dim
    "sum_keepdim": U(lambda x: x.sum(-1, keepdim=True), 4, 32),
    "sum": U(lambda x: x.sum(-1), 4, 32),
    "sum_3d": U(lambda x: x.sum(dim=2), 2, 4, 32),
    "mean_keepdim": U(lambda x: x.mean(-1, keepdim=True), 4, 32),
    "mean": U(lambda x: x.mean(-1), 4, 32),
    "amax_keepdim": U(lambda x: x.amax(-1, keepdim=True), 4, 32),
    "amax": U(lambda x: x.amax(-1), 4, 32),
    "softmax": U(lambda x: torch.softmax(x, dim=-1), 4, 32),
    "softmax_3d": U(lambda x: torch.softmax(x, dim=2), 2, 4, 32),
    "rmsnorm": U(lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), 4, 32),
    # reductions over any dims and over all of them (a view makes them the last)
    "sum_dim0": U(lambda x: x.sum(0), 4, 32),
    "sum_all": U(lambda x: x.sum(), 4, 32),
    "mean_all_3d": U(lambda x: x.mean(), 2, 4, 8),
    "mean_dims_keepdim": U(lambda x: x.mean((0, 2), keepdim=True), 2, 4, 8),
    "amax_dim1_3d": U(lambda x: x.amax(1), 2, 4, 8),
    "amin": U(lambda x: x.amin(-1), 4, 32),
    "amin_dim0_keepdim": U(lambda x: x.amin(0, keepdim=True), 4, 32),
    "any_bool_out": U(lambda x: (x > 1).any(-1), 4, 32),
    "argmax_all": U(lambda x: x.argmax(), 4, 32),
    "argmax_all_keepdim": U(lambda x: torch.argmax(x, keepdim=True), 2, 4, 8),
    "softmax_dim0": U(lambda x: torch.softmax(x, dim=0), 4, 32),
    "log_softmax_dim1_3d": U(lambda x: torch.log_softmax(x, dim=1), 2, 4, 8),
    "cumsum": U(lambda x: torch.cumsum(x, dim=-1), 4, 32),
    "cumsum_dim0_3d": U(lambda x: torch.cumsum(x, dim=0) * 2.0, 3, 4, 8),
    # normalisations
    "layer_norm": (lambda: nn.LayerNorm(32), {"input": X(4, 32)}),
    "layer_norm_2d_shape": (lambda: nn.LayerNorm((4, 8)), {"input": X(2, 4, 8)}),
    "layer_norm_no_affine": U(lambda x: F.layer_norm(x, (32,)) + 1.0, 4, 32),
    "group_norm": (lambda: nn.GroupNorm(2, 8), {"input": X(2, 8, 6)}),
    "group_norm_4d": (lambda: nn.GroupNorm(4, 4), {"input": X(2, 4, 3, 5)}),
    # attention as torch decomposes it: masks, logical_not, any, is_causal
    "sdpa": QKV(),
    "sdpa_causal": QKV(is_causal=True),
    "sdpa_bool_mask": (lambda: MaskedAttention(), {"q": X(1, 2, 4, 8), "k": X(1, 2, 4, 8),
                                                   "v": X(1, 2, 4, 8), "mask": Mask(4, 4)}),
    "masked_fill_bool_input": (lambda: MaskedFill(), {"x": X(4, 32), "mask": Mask(4, 32)}),
    # constants made at export, rounding, tensor exponents and bounds, soft-capping
    "arange": U(lambda x: x + torch.arange(32), 4, 32),
    "arange_float_step": U(lambda x: x * torch.arange(0.0, 1.0, 1 / 32), 4, 32),
    "floor": U(lambda x: torch.floor(x * 4.0), 4, 32),
    "ceil": U(lambda x: torch.ceil(x * 4.0), 4, 32),
    "trunc": U(lambda x: torch.trunc(x * 4.0), 4, 32),
    "div_trunc": B(lambda x, y: torch.div(x * 8.0, y, rounding_mode="trunc"), (4, 32), (4, 32)),
    "div_floor": B(lambda x, y: torch.div(x * 8.0, y, rounding_mode="floor"), (4, 32), (4, 32)),
    "floor_divide_scalar": U(lambda x: torch.div(x, 0.1, rounding_mode="floor"), 4, 32),
    "pow_tensor": B(lambda x, y: x.abs() ** y, (4, 32), (4, 32)),
    "pow_tensor_negative_base": (lambda: WithConstant(lambda x, c: x ** c, torch.arange(-3, 5)),
                                 {"x": X(4, 8)}),
    "pow_scalar_base": U(lambda x: 2.0 ** x, 4, 32),
    "clamp_tensor": B(lambda x, y: torch.clamp(x, y, y + 0.5), (4, 32), (4, 32)),
    "clamp_min_tensor": B(lambda x, y: x.clamp(min=y), (4, 32), (32,)),
    "tanh_softcap": U(lambda x: torch.tanh(x / 0.5) * 0.5, 4, 32),
    "linear_softcap": (lambda: WithConstant(lambda x, w: torch.tanh(x @ w / 3.0) * 3.0,
                                            torch.randn(32, 16)), {"x": X(4, 32)}),
    # predicates returned as torch.bool
    "gt_bool_out": U(lambda x: x > 0, 4, 32),
    "logical_not_bool_out": U(lambda x: torch.logical_not(x > 0), 4, 32),
    "logical_and_or_xor": B(lambda x, y: torch.logical_xor(torch.logical_and(x > 0, y > 0),
                                                           torch.logical_or(x > 1, y < -1)),
                            (4, 32), (4, 32)),
    "bitwise_not_bool": U(lambda x: ~(x > 0), 4, 32),
    "bitwise_and_or_xor_bool": B(lambda x, y: ((x > 0) & (y > 0)) | ((x < 0) ^ (y > 1)),
                                 (4, 32), (4, 32)),
    # gather
    "embedding": (lambda: Embed(), {"idx": lambda seed: torch.randint(
        0, 50, (2, 5), generator=torch.Generator().manual_seed(seed))}),
    "embedding_then_mul": (lambda: EmbedThenScale(), {
        "idx": lambda seed: torch.randint(0, 50, (6,), generator=torch.Generator().manual_seed(seed)),
        "x": X(6, 32)}),
    # layout (each alone, and each feeding a compute op)
    "cat_last_dim": B(lambda x, y: torch.cat([x, y], dim=-1), (4, 32), (4, 16)),
    "cat_dim0": B(lambda x, y: torch.cat([x, y], dim=0), (4, 32), (2, 32)),
    "cat_then_exp": B(lambda x, y: torch.exp(torch.cat([x, y], dim=1)), (4, 8), (4, 24)),
    "slice_last_dim": U(lambda x: x[:, 4:20], 4, 32),
    "slice_dim0": U(lambda x: x[1:3], 4, 32),
    "slice_step": U(lambda x: x[:, ::2], 4, 32),
    "slice_then_add": U(lambda x: x[:, 4:20] + x[:, 16:], 4, 32),
    "view": U(lambda x: x.view(4, 4, 8), 4, 32),
    "view_then_mul": U(lambda x: x.view(2, 2, 32) * 2.0, 4, 32),
    "reshape": U(lambda x: x.reshape(8, 16), 4, 32),
    "reshape_of_transpose": U(lambda x: x.t().reshape(32, 4) + 1.0, 4, 32),
    "permute": U(lambda x: x.permute(2, 0, 1), 2, 4, 8),
    "permute_then_exp": U(lambda x: torch.exp(x.permute(1, 2, 0)), 2, 4, 8),
    "transpose": U(lambda x: x.transpose(0, 1), 4, 32),
    "transpose_then_mm": B(lambda x, y: x.transpose(0, 1) @ y, (32, 4), (32, 16)),
    "unsqueeze": U(lambda x: x.unsqueeze(1), 4, 32),
    "unsqueeze_then_add": B(lambda x, y: x.unsqueeze(1) + y, (4, 32), (3, 32)),
    "expand": U(lambda x: x.expand(3, 4, 32), 1, 4, 32),
    "expand_then_mul": B(lambda x, y: x.expand(4, 32) * y, (4, 1), (4, 32)),
    "clone": U(lambda x: x.clone(), 4, 32),
    "clone_then_neg": U(lambda x: -x.clone(), 4, 32),
    # 0-d tensors: constants, buffers, parameters, inputs and outputs
    "mul_0d_constant": U(lambda x: x * torch.tensor(8.0), 4, 32),
    "mul_0d_buffer": (lambda: WithConstant(torch.mul, torch.tensor(8.0)), {"x": X(4, 32)}),
    "add_0d_parameter": (lambda: WithConstant(torch.add, torch.tensor(0.5), parameter=True),
                         {"x": X(4, 32)}),
    "mul_0d_input": B(torch.mul, (4, 32), ()),
    "elementwise_0d": U(lambda x: x * 2.0 + 1.0),
    "linear_then_0d_scale": (lambda: WithConstant(lambda x, c: F.linear(x, torch.ones(8, 32)) * c,
                                                  torch.tensor(3.0)), {"x": X(4, 32)}),
    "embedding_0d_index": (lambda: Embed(), {"idx": lambda seed: torch.randint(
        0, 50, (), generator=torch.Generator().manual_seed(seed))}),
    # empty tensors: pieces of a cat, a product over no columns, a reduction of none
    "cat_empty_piece": U(lambda x: torch.cat([x, x[..., 16:]], -1) * 2.0, 4, 16),
    "cat_empty_piece_of_computed": U(lambda x: torch.cat([x + 1, (x * 2)[..., 16:]], -1), 4, 16),
    "cat_empty_first_piece_3d": U(lambda x: torch.cat([x[..., :0], x], -1), 2, 4, 16),
    "cat_empty_dim0": U(lambda x: torch.cat([x, x[4:]], 0) * 3.0, 4, 16),
    "cat_all_empty": U(lambda x: torch.cat([x[..., :0], x[..., 16:]], -1) + 1.0, 4, 16),
    "slice_empty": U(lambda x: x[:, 16:] + 1.0, 4, 16),
    "matmul_k0": B(lambda x, y: x[:, :0] @ y[:0] + 1.0, (4, 16), (16, 8)),
    "mm_no_rows": B(torch.mm, (0, 16), (16, 8)),
    "bmm_no_batch": B(torch.bmm, (0, 4, 8), (0, 8, 4)),
    "sum_of_empty": U(lambda x: x[:, :0].sum(-1) + x[:, 0], 4, 16),
    "mean_of_empty": U(lambda x: x[:, :0].mean(-1), 4, 16),   # NaN, as torch's
    "softmax_of_empty": U(lambda x: torch.softmax(x[:, :0], -1), 4, 16),
}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to the largest value; NaN must be where eager has NaN."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), "NaN where eager PyTorch has none, or missing"
    got, want = got[~nan], want[~nan]
    if not want.numel():
        return 0.0
    return float((got - want).abs().max() / max(float(want.abs().max()), 1e-6))


def check(module: nn.Module, make_inputs: dict, workers: int) -> None:
    module.eval()
    example = {k: f(0) for k, f in make_inputs.items()}
    engine = tilec.api.compile(module, tuple(example.values()), workers=workers)
    assert engine.input_names == tuple(make_inputs)
    for seed in (1, 2):   # fresh inputs, not the example ones
        inputs = {k: f(100 * seed + i) for i, (k, f) in enumerate(make_inputs.items())}
        with torch.no_grad():
            want = module(*inputs.values())
        for backend in ("interpret", "reference"):
            out = engine.run(backend=backend, **inputs)
            assert list(out) == ["output0"], out.keys()
            got = out["output0"]
            assert got.shape == want.shape and got.dtype == want.dtype, (backend, got.shape)
            err = rel_err(got.float(), want.float())
            assert err <= REL_TOL, f"{backend}: relative error {err:.3g}"


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_op(case, workers):
    make_module, make_inputs = CASES[case]
    torch.manual_seed(0)
    check(make_module(), make_inputs, workers)


class Cummax(nn.Module):
    def forward(self, x):
        return torch.cummax(x, dim=-1).values + 1.0


class Sort(nn.Module):
    def forward(self, x):
        return torch.sort(x, dim=-1).values * 2.0


@pytest.mark.parametrize("module, aten_name", [(Cummax, "cummax"), (Sort, "sort")])
def test_unsupported_op_names_aten_op_and_source_line(module, aten_name):
    # torch.export records the frame of the module's forward, so that is the line named.
    lines, first = inspect.getsourcelines(module.forward)
    line = first + next(i for i, text in enumerate(lines) if f"torch.{aten_name}" in text)
    with pytest.raises(UnsupportedOpError) as info:
        tilec.api.compile(module(), (randn(4, 32, seed=0),))
    message = str(info.value)
    assert f"aten.{aten_name}" in message
    assert f"test_ops.py:{line}" in message
    assert f"torch.{aten_name}(x, dim=-1)" in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize("fn, words", [
    (lambda x, y: torch.div(x, y, rounding_mode="floor"), "aten.div with rounding_mode"),
    (lambda x, y: x ** y, "aten.pow of integers"),
    (lambda x, y: x.sum(0), "aten.sum.dim_IntList of int64"),
    (lambda x, y: torch.cumsum(x, 0), "aten.cumsum of int64"),
    (lambda x, y: ~x, "aten.bitwise_not.default of torch.int64"),
    (lambda x, y: x | y, "aten.bitwise_or.Tensor of torch.int64"),
])
def test_unsupported_variants_are_refused_in_one_line(fn, words):
    ints = (torch.randint(1, 9, (4, 8)), torch.randint(1, 9, (4, 8)))
    with pytest.raises(UnsupportedOpError) as info:
        tilec.api.compile(Fn(fn), ints)
    assert words in str(info.value) and "test_ops.py" in str(info.value)
    assert len(str(info.value).splitlines()) == 1
