"""One code type, one emitter and one template per group kind (codegen/emit.py KINDS):
every kind that fuse makes is rendered by exactly the template its code type names."""
from __future__ import annotations

from pathlib import Path

import tilec.api
from tilec.codegen.emit import KINDS
from tilec.codegen.group_emitter import GroupCode
from tilec.codegen.render import TEMPLATES

BLOCK = Path(__file__).resolve().parents[2] / "examples" / "block.yaml"


def test_each_kind_has_a_code_type_naming_its_own_template():
    types = [code_type for code_type, _ in KINDS.values()]
    assert len(set(types)) == len(types)          # no code type serves two kinds
    for kind, (code_type, emit) in KINDS.items():
        assert issubclass(code_type, GroupCode) and callable(emit)
        assert code_type.template == f"{kind}.py.j2"
        assert (TEMPLATES / code_type.template).is_file()


def test_the_kinds_fuse_makes_are_the_kinds_codegen_knows():
    # examples/block.yaml fuses into all three: a row group, matmuls, an attention
    engine = tilec.api.compile(str(BLOCK))
    fused = engine.data.manifest.schedule.taskgraph.fused
    assert {g.kind for g in fused.groups} == set(KINDS) == {"row", "matmul", "attention"}
