"""The kernel interface (tilec/ir/abi.py) is what the rendered kernel, the task table
and the executors use: the kernel loads each record field at abi's offset, records
round-trip through abi's helpers, and a launch passes abi's arguments in the kernel's
order."""
from __future__ import annotations

import ast

from engines import compiled
from tilec.ir import abi
from tilec.runtime import enginefile as engine_file


def test_record_round_trip():
    rec = abi.encode_record(3, 7, (1, 2, 4), [(5, 1), (9, 2)], 4, (0, 12, 8), 11)
    assert len(rec) == abi.record_width(4)
    assert rec[abi.OPCODE] == 3 and rec[abi.ARGS_ROW] == 7
    assert rec[abi.TILE:abi.TILE + 3] == [1, 2, 4]
    assert abi.record_waits(rec) == [(5, 1), (9, 2)]
    assert abi.record_prefetch(rec, 4) == (0, 12, 8)
    assert rec[abi.SIGNAL] == 11


def _kernel_loads(source: str) -> dict[str, str]:
    """In the kernel function: variable -> the address expression of its `tl.load`."""
    tree = ast.parse(source)
    kernel = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
                  and n.name == abi.KERNEL_NAME)
    loads = {}
    for node in ast.walk(kernel):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            call = node.value   # tl.load(address), maybe then .to(...) and * something
            while isinstance(call, ast.BinOp) or isinstance(call, ast.Call) and isinstance(
                    call.func, ast.Attribute) and ast.unparse(call.func) != "tl.load":
                call = call.left if isinstance(call, ast.BinOp) else call.func.value
            if isinstance(call, ast.Call) and ast.unparse(call.func) == "tl.load":
                loads[node.targets[0].id] = ast.unparse(call.args[0])
    return loads


def test_the_kernel_reads_records_where_abi_puts_the_fields():
    engine = engine_file.load(compiled("block"))
    loads = _kernel_loads(engine.kernel_source)
    field = {"op": abi.OPCODE, "arow": abi.ARGS_ROW, "t0": abi.TILE, "t1": abi.TILE + 1,
             "t2": abi.TILE + 2, "nwaits": abi.NUM_WAITS}
    for name, offset in field.items():
        assert loads[name] == ("rec" if offset == 0 else f"rec + {offset}"), name
    assert loads["evs"] == f"rec + {abi.WAITS} + 2 * slot"
    assert loads["needs"] == f"rec + {abi.WAITS + 1} + 2 * slot"
    assert loads["signal"] == "rec + REC - 1" and abi.SIGNAL == -1
    assert f"REC = tl.constexpr({engine.record_width})" in engine.kernel_source
    at = abi.prefetch_offset(engine.manifest.max_waits)
    assert f"PREFETCH_AT = tl.constexpr({at})" in engine.kernel_source


def test_a_launch_passes_the_kernel_its_arguments_in_order():
    engine = engine_file.load(compiled("block"))
    kernel = next(n for n in ast.parse(engine.kernel_source).body
                  if isinstance(n, ast.FunctionDef) and n.name == abi.KERNEL_NAME)
    names = [a.arg for a in kernel.args.args]
    pools = [p.name for p in engine.manifest.schedule.pools]
    values = {name: name for name, _ in abi.LAUNCH_ARGS}
    assert list(abi.launch_arguments(values, pools)) + list(abi.LAUNCH_CONSTEXPRS) == names
    assert list(abi.launch_signature((p.name, p.dtype)
                                     for p in engine.manifest.schedule.pools)) == names
