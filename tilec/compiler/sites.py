"""Where an op comes from, as a user reads it: their source line and module path
(`block.norm: model.py:12: return self.norm(h + x)`), not torch's or tilec's frames.
Errors name these; ops keep them (`Op.source`) for run-time errors and `tilec inspect`."""
from __future__ import annotations

import os
import re
import sysconfig
import traceback

import torch
import torch.fx

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TILEC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_LIBRARY_DIRS = tuple({os.path.abspath(p) + os.sep for key, p in sysconfig.get_paths().items()
                       if key in ("stdlib", "platstdlib", "purelib", "platlib")})


def user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of `exc`'s traceback in the model torch.export traced:
    inside the export call, outside torch, preferably outside Python's and the installed
    packages' code too (a model that calls a library is best pointed at its call); None
    if that frame is tilec's own (a family model: then the error is tilec's bug, kept as
    it is)."""
    frames = [(os.path.abspath(f.filename), f) for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<")]
    first = next((i for i, (file, _) in enumerate(frames) if file.startswith(_TORCH_DIR)), 0)
    outside = [(file, f) for file, f in frames[first:] if not file.startswith(_TORCH_DIR)]
    own = [(file, f) for file, f in outside if not file.startswith(_LIBRARY_DIRS)]
    if not (own or outside):
        return None
    file, frame = (own or outside)[-1]
    return None if file.startswith(_TILEC_DIR) else frame


def source_line(node: torch.fx.Node) -> str:
    """The user's source line that produced `node` ('file:line: code')."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', trace)
    if not frames:
        return "unknown source line"
    # the innermost frame outside torch itself (nn.Embedding's forward is not the user's)
    theirs = [f for f in frames if not f[0].startswith(_TORCH_DIR)]
    file, line, code = (theirs or frames)[-1]
    return f"{file}:{line}: {code.strip()}"


def user_site(node: torch.fx.Node) -> str:
    """Where an error points the user: the path of the innermost module whose forward()
    produced `node`, then their source line ('block.norm: model.py:12: return
    self.norm(h + x)'); the source line alone at the top module."""
    scope = [path for path in module_scope(node) if path]
    line = source_line(node)
    return f"{scope[-1]}: {line}" if scope else line


def module_scope(node: torch.fx.Node) -> tuple[str, ...]:
    """The paths of the modules whose forward() produced `node`, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return tuple(path for path, _ in stack.values())
