"""README's operator list and `supported_ops()` name the same operators: every ATen op
with a handler is in the list, and every operator name the list shows has a handler
(or is what torch decomposes into one)."""
from __future__ import annotations

import re
from pathlib import Path

from tilec.compiler.frontend import supported_ops

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "## Supported operators"
# names the list shows that reach tilec as other ATen ops
DECOMPOSED = {"softmax": "_softmax", "log_softmax": "_log_softmax", "index_fill": "index_put",
              "attn_mask": "where", "is_causal": "arange", "rounding_mode": "div",
              "torch.bool": "frontend's bool outputs"}


def operator_list() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n", text.index(HEADING))   # after the heading's own line
    return text[start:text.index("\n## ", start)]


def listed_names() -> set[str]:
    """The backticked lowercase names of the list (not `nn.Linear`, `x.mean()`, `@`)."""
    return set(re.findall(r"`([a-z_][a-z0-9_.]*)`", operator_list()))


def handled_names() -> set[str]:
    return {name.split(".")[1] for name in supported_ops()}


def test_every_supported_op_is_in_the_readme_list():
    missing = sorted(handled_names() - listed_names())
    assert not missing, f"README's operator list lacks {missing} (supported_ops())"


def test_every_op_the_readme_lists_is_supported():
    unknown = sorted(listed_names() - handled_names() - set(DECOMPOSED))
    assert not unknown, f"README lists {unknown}, which supported_ops() does not have"
