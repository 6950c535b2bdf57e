"""The engine file: one safetensors container, no pickle (DESIGN.md, "Engine file";
docs/engine-format.md), in parts:

- `format.py`: the format's names, the `Manifest` and the `EngineFile` a file becomes;
- `tables.py`: the task table codec (a schedule's queues, waits and signals as records);
- `digest.py`: the checksum;
- `write.py` (with `direct.py`, the O_DIRECT stream): `save`, `PendingSave`;
- `read.py`: `load`, which runs every check of `checks.py` before anything is used.

The names below are the package's interface; the rest is each module's own.
"""
from tilec.runtime.enginefile.checks import render_manifest
from tilec.runtime.enginefile.format import (FORMAT, FORMAT_VERSION, TORCH_DTYPES,
                                             DeviceEngines, EngineFile, GenerationSpec,
                                             IOSpec, Manifest)
from tilec.runtime.enginefile.read import load
from tilec.runtime.enginefile.tables import decode_schedule, encode_tables
from tilec.runtime.enginefile.write import PendingSave, aot_text, check_writable, save

__all__ = ["FORMAT", "FORMAT_VERSION", "TORCH_DTYPES", "DeviceEngines", "EngineFile",
           "GenerationSpec", "IOSpec", "Manifest", "PendingSave", "aot_text",
           "check_writable", "decode_schedule", "encode_tables", "load", "render_manifest",
           "save"]
