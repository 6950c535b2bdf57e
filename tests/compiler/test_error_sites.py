"""Errors name what the user wrote: the module path and their source line of an
unsupported op (not torch's internals), a parameter's own name (not the exported
placeholder's)."""
import pytest
import torch

import tilec.api as tilec_api
from tilec.errors import UnsupportedOpError


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.AdaptiveAvgPool1d(2)   # (no tilec handler)

    def forward(self, h, x):
        return self.norm(h + x)   # the call site the error names


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, h, x):
        return self.block(h, x)


def test_unsupported_op_names_module_path_and_call_site():
    with pytest.raises(UnsupportedOpError) as info:
        tilec_api.compile(Model(), (torch.randn(2, 8), torch.randn(2, 8)))
    message = str(info.value)
    assert "at block.norm: " in message
    assert "test_error_sites.py:17: return self.norm(h + x)" in message
    assert "torch/nn" not in message


def test_dtype_error_names_the_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, dtype=torch.float64))
    with pytest.raises(UnsupportedOpError, match=r"unsupported dtype torch.float64 for "
                                                 r"parameter 0\.weight$"):
        tilec_api.compile(model, (torch.randn(2, 8, dtype=torch.float64),))
