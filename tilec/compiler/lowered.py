"""What lowering makes, apart from the lowering itself (compiler/frontend.py): the
strided view an FX value becomes (`View`) and the result, an `ir.Graph` with the data of
its placeholders (`Lowered`). Their own module so the op handlers (aten_ops.py) and the
layer builder (layers.py) read them without importing the frontend that calls them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tilec.ir.graph import Graph, Operand, contiguous_strides


@dataclass(frozen=True)
class View:
    """An FX tensor value: a strided view of IR value `value`."""

    value: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int
    dtype: str

    def operand(self) -> Operand:
        return Operand(self.value, self.shape, self.strides, self.offset)

    @property
    def contiguous(self) -> bool:
        return self.offset == 0 and self.strides == contiguous_strides(self.shape)


@dataclass(frozen=True)
class Lowered:
    graph: Graph
    constants: dict[str, torch.Tensor]        # weight and state placeholders' data
    input_names: tuple[str, ...]              # user-facing input names, in call order
    output_names: tuple[str, ...]
    state_names: dict[str, str]               # state op name -> module buffer name
