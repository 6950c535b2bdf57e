"""Nothing read from a file or given as a name becomes code (issue 19, item 1).

The runtime renders the kernel again from a loaded manifest and runs that, so a manifest
string that reached the source raw would run on every `tilec run`, checksum or not
(anyone can recompute a checksum). These tests put hostile text (newlines, carriage
returns, quotes, triple quotes, backslashes, Unicode line separators) into every string
of a manifest, into the model name of a compile, and into hand-written kernels, and
check that the rendered module keeps the kernel's shape, that nothing runs, and that
the source checker refuses every way out of the kernel's vocabulary.
"""
from __future__ import annotations

import ast
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import tilec
from engines import compiled, read_raw, resign
from test_hostile import run_cli
from tilec.codegen.safety import UnsafeKernelError, check_kernel_source, text_literal
from tilec.ir.abi import KERNEL_NAME
from tilec.ir.serial import from_plain
from tilec.runtime import enginefile as engine_file
from tilec.runtime.enginefile import Manifest, render_manifest

BREAKS = ["\n", "\r", "\r\n", "\u2028", "\u2029", "\x0b", "\x0c", "\x85", "\x1c"]
QUOTES = ['"""', "'''", '"', "'", "\\", "\\\n", "#", ")", "):"]


def payload(marker) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def hostile_texts(marker) -> list[str]:
    code = payload(marker)
    texts = [f"m{b}{code}{b}#" for b in BREAKS]
    texts += [f"m{q}{b}{code}{b}{q}" for q in QUOTES for b in ("\n", "\r", "\u2028")]
    return texts


def shape(source: str) -> tuple[list[str], list[str]]:
    """What a kernel module is at the top level: its statements other than functions
    (dumped) and the names of its functions, in order."""
    tree = ast.parse(source)
    statements = [ast.dump(s) for s in tree.body if not isinstance(s, ast.FunctionDef)]
    functions = [s.name for s in tree.body if isinstance(s, ast.FunctionDef)]
    return statements, functions


@pytest.fixture(scope="module")
def block():
    return compiled("block")


@pytest.fixture(scope="module")
def plain_manifest(block):
    return json.loads(read_raw(block)[0]["manifest"])


@pytest.fixture(scope="module")
def original_shape(plain_manifest):
    return shape(render_manifest(from_plain(Manifest, plain_manifest)).source)


# ---- the model name ---------------------------------------------------------------------

def resign_rendered(src, dst, edit):
    """`src` with its manifest edited and the kernel this tilec renders from the edited
    manifest stored with it: what an attacker writes, since tilec renders it for them."""
    def manifest_and_kernel(meta):
        plain = json.loads(meta["manifest"])
        edit(plain)
        meta["manifest"] = json.dumps(plain, separators=(",", ":"), sort_keys=True)
        meta["kernel"] = render_manifest(from_plain(Manifest, plain)).source
    return resign(src, dst, meta=manifest_and_kernel)


def test_hostile_model_names_in_a_signed_engine_run_as_text(capsys, block, tmp_path):
    """The model name is free text: an engine whose name holds code loads and runs (the
    name is shown as a literal in the kernel's header comment) and the code never runs."""
    marker = tmp_path / "executed"
    for i, name in enumerate(hostile_texts(marker)[:3] + [f"m\n{payload(marker)}"]):
        path = resign_rendered(block, tmp_path / f"e{i}",
                               lambda p, name=name: p.__setitem__("model", name))
        code, _, err = run_cli(capsys, "run", path, "--backend", "interpret")
        assert code == 0, err
        loaded = engine_file.load(path)
        assert f"# Engine: {text_literal(name)};" in loaded.kernel_source
        assert not marker.exists(), repr(name)


def test_a_hostile_name_given_to_compile_stays_text(tmp_path):
    marker = tmp_path / "executed"
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU())
    x = torch.randn(4, 16)
    name = f'net"""\n{payload(marker)}\n"""\u2028{payload(marker)}'
    engine = tilec.compile(model, (x,), name=name, workers=2)
    got = engine.run(backend="interpret", input=x)["output0"]
    torch.testing.assert_close(got, model(x).detach(), rtol=1e-4, atol=1e-5)
    assert engine.summary()["model"] == name
    assert not marker.exists()
    assert shape(engine.data.kernel_source)[1][-1] == KERNEL_NAME


# ---- every string of a manifest ---------------------------------------------------------

def _strings(x, path=()):
    """(path, value) of every string in a plain manifest."""
    if isinstance(x, str):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _strings(v, path + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _strings(v, path + (i,))


def _replace_all(x, old: str, new: str):
    """`x` with every string equal to `old` replaced (so names stay consistent: a
    renamed pool is renamed wherever the manifest names it)."""
    if x == old:
        return new
    if isinstance(x, dict):
        return {k: _replace_all(v, old, new) for k, v in x.items()}
    if isinstance(x, list):
        return [_replace_all(v, old, new) for v in x]
    return x


def _set(plain, path, value):
    for p in path[:-1]:
        plain = plain[p]
    plain[path[-1]] = value


def assert_renders_as_kernel_or_refused(plain, original_shape) -> bool:
    """Decoding and rendering either refuse the manifest (as `load` would: False) or give
    a module with the original top-level statements and functions (True)."""
    try:
        rendered = render_manifest(from_plain(Manifest, plain))
    except Exception:   # refused by the decoder or the renderer as not a tilec manifest
        return False
    assert shape(rendered.source) == original_shape
    return True


TEXT = st.sampled_from(hostile_texts("/nonexistent/marker")) | st.text(
    alphabet=st.sampled_from(list("ab_1 \"'\\#():=\n\r\t\u2028\u2029\x85\x0c")), max_size=24)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), text=TEXT, append=st.booleans())
def test_every_string_everywhere(plain_manifest, original_shape, data, text, append):
    """One distinct string of the manifest, replaced wherever it occurs by hostile text
    (or with hostile text appended)."""
    values = sorted({v for _, v in _strings(plain_manifest)})
    old = data.draw(st.sampled_from(values))
    new = old + text if append else text
    assert_renders_as_kernel_or_refused(_replace_all(plain_manifest, old, new), original_shape)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), text=TEXT)
def test_every_string_field_alone(plain_manifest, original_shape, data, text):
    """One string field of the manifest (one occurrence) set to hostile text."""
    paths = [p for p, _ in _strings(plain_manifest)]
    path = data.draw(st.sampled_from(paths))
    plain = json.loads(json.dumps(plain_manifest))
    _set(plain, path, text)
    assert_renders_as_kernel_or_refused(plain, original_shape)


def test_every_distinct_string_once(plain_manifest, original_shape):
    """Exhaustively: each distinct string of the manifest, everywhere it occurs, with a
    line break and code appended."""
    values = sorted({v for _, v in _strings(plain_manifest)})
    assert len(values) > 20
    rendered = [old for old in values if assert_renders_as_kernel_or_refused(
        _replace_all(plain_manifest, old, old + "\nimport os\n"), original_shape)]
    # free text renders (as literals), names and kinds are refused: both kinds were seen
    assert plain_manifest["model"] in rendered and len(rendered) < len(values)


def test_attribute_numbers_are_numbers():
    """Op attributes decode as any JSON, and a top-k's k is pasted into its loop: given as
    text (and the kernel rendered from that text stored with it), it is refused."""
    plain = json.loads(read_raw(compiled("glm_dsa_tiny"))[0]["manifest"])
    ops = plain["schedule"]["taskgraph"]["fused"]["graph"]["ops"]
    topk = next(op for op in ops if op["kind"] == "topk")
    topk["attrs"] = [[k, "2 + len(__import__('os').name)" if k == "k" else v]
                     for k, v in topk["attrs"]]
    with pytest.raises(UnsafeKernelError, match="topk k"):
        render_manifest(from_plain(Manifest, plain))


# ---- the source checker -----------------------------------------------------------------

KERNEL = '''import triton
import triton.language as tl
import triton.language.extra.cuda

REC = tl.constexpr(9)


@triton.jit(noinline=True)
def task_0(args, arow, t0, t1, t2, w_float32):
    x = tl.load(w_float32 + t0).to(tl.float32)
    tl.store(w_float32 + t1, tl.exp(x) + float("inf"))


@triton.jit
def tilec_engine(tasks, w_float32, BLOCKING: tl.constexpr):
    for i in range(3):
        task_0(tasks, 0, i, i, i, w_float32)
'''


def test_the_checker_accepts_a_kernel():
    check_kernel_source(KERNEL, KERNEL_NAME)


@pytest.mark.parametrize("edit", [
    ("x = tl.load", "x = __import__('os').system('true') + tl.load"),
    ("x = tl.load", "x = open('/tmp/x', 'w') + tl.load"),
    ("x = tl.load", "x = tl.inline_asm_elementwise('trap;', '', [], tl.int32, True, 1) + tl.load"),
    ("x = tl.load", "x = tl.core.builtin + tl.load"),
    ("x = tl.load", "x = x.__class__ + tl.load"),
    ("x = tl.load", "x = getattr(tl, 'load') + tl.load"),
    ("x = tl.load", "x = (lambda: 0)() + tl.load"),
    ("x = tl.load", "x = eval('1') + tl.load"),
    ("x = tl.load", "x = [y for y in range(2)] + tl.load"),
    ("    x = tl.load", "    import os\n    x = tl.load"),
    ("    x = tl.load", "    global REC\n    x = tl.load"),
    ("    x = tl.load", "    tl = triton\n    x = tl.load"),
    ("    x = tl.load", "    with t0:\n        pass\n    x = tl.load"),
    ("    x = tl.load", "    try:\n        pass\n    except Exception:\n        pass\n    x = tl.load"),
    ("    x = tl.load", "    del t0\n    x = tl.load"),
    ("REC = tl.constexpr(9)", "REC = tl.constexpr(9)\nprint('hello')"),
    ("REC = tl.constexpr(9)", "REC = open('/tmp/x')"),
    ("REC = tl.constexpr(9)", "REC = tl.constexpr('9')"),
    ("import triton\n", "import os\nimport triton\n"),
    ("def task_0(", "def evil(", ),
    ("@triton.jit(noinline=True)", "@triton.jit(noinline=True)\n@print"),
    ("@triton.jit(noinline=True)", "@triton.jit(do_not_specialize=print('x'))"),
    ("t2, w_float32):", "t2, w_float32=print('x')):"),
    ("t2, w_float32):", "t2, w_float32: print('x')):"),
    ("BLOCKING: tl.constexpr", "BLOCKING: print('x')"),
    ("def task_0(args", "class C:\n    pass\n\n\ndef task_0(args"),
    ("    for i in range(3):", "    for i in range(3):\n        yield i"),
])
def test_the_checker_refuses_what_is_not_kernel_code(edit):
    old, new = edit
    assert old in KERNEL
    with pytest.raises(UnsafeKernelError):
        check_kernel_source(KERNEL.replace(old, new, 1), KERNEL_NAME)


def test_every_example_kernel_passes_the_checker():
    for example in ("mlp", "block", "llama_tiny", "glm_dsa_tiny"):
        check_kernel_source(engine_file.load(compiled(example)).kernel_source, KERNEL_NAME)


def test_text_literal_is_one_line():
    for text in hostile_texts("/m") + ["\x00", "\ud800", "a" * 1000]:
        lit = text_literal(text)
        assert len(lit.splitlines()) == 1 and len(lit) < 260
        assert ast.literal_eval(lit) == (text if len(text) <= 200 else text[:197] + "...")


def test_inspect_prints_hostile_names_as_text(capsys, block, tmp_path):
    """Names reach the terminal through rich: markup and escape sequences in them are
    shown, not interpreted (a stray closing tag used to crash `inspect`)."""
    name = "evil\x1b]0;title\x07[/bold][link=http://x]y[/link]\nline"
    path = resign_rendered(block, tmp_path / "e", lambda p: p.__setitem__("model", name))
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 0, err
    assert "\x1b]0;" not in out and "\x07" not in out
    assert "evil\\x1b]0;title\\x07[/bold][link=http://x]y[/link]\\nline" in out
