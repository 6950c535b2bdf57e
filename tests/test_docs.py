"""The documentation stays true: its runnable blocks run, and its reference tables
match the code they describe.

Runnable blocks (README.md, "Runnable blocks"): a fenced block whose info string is
`python run`, `console run` or `yaml run`. The blocks of one page run in order in one
scratch folder holding a copy of examples/ and an empty build/.

Reference tables: docs/model-yaml.md's key table against the schema in
tilec/compiler/config.py; docs/cli.md's option tables against tilec.cli.build_parser().
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tilec.cli import build_parser, main
from tilec.codegen import exprs
from tilec.compiler import config as cfgmod
# frontend imports every handler module (aten_reductions's too): HANDLERS is whole before
# registries_restored copies it, or restoring it would drop the handlers imported later
from tilec.compiler import aten_ops, frontend  # noqa: F401
from tilec.ir.abi import FIXED_FIELDS, PREFETCH_FIELDS
from tilec.ir.target import TARGETS
from tilec.runtime import enginefile as engine_file
from tilec.runtime import reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
RUNNABLE = ("python", "console", "yaml")


# ---- reading markdown -----------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    page: Path
    line: int          # 1-based line of the first content line
    lang: str
    run: bool
    text: str

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    """Fenced blocks (``` or longer fences; a block closes at a fence at least as long)."""
    blocks, lines = [], page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(`{3,})([^`]*)$", lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2).split()
        j = i + 1
        while j < len(lines) and not re.match(rf"^{fence}`*\s*$", lines[j]):
            j += 1
        blocks.append(Block(page, i + 2, info[0] if info else "", info[1:] == ["run"],
                            "\n".join(lines[i + 1:j]) + "\n"))
        i = j + 1
    return blocks


def prose(page: Path) -> str:
    """The page without its fenced blocks (so tables inside examples do not count)."""
    text = page.read_text(encoding="utf-8")
    for b in code_blocks(page):
        text = text.replace(b.text, "")
    return text


def split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table: a list of rows, each {header: cell}."""
    out, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        rule = i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1])
        if lines[i].startswith("|") and rule:
            header = split_row(lines[i])
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, split_row(lines[i]))))
                i += 1
            out.append(rows)
        else:
            i += 1
    return out


def sections(text: str) -> dict[str, str]:
    """'## heading' -> the text up to the next '## ' heading."""
    parts = re.split(r"^## +(.+)$", text, flags=re.M)
    return {parts[k].strip(): parts[k + 1] for k in range(1, len(parts), 2)}


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# ---- running the runnable blocks ------------------------------------------------------

def run_python(block: Block) -> None:
    # Pad so tracebacks show the page's own line numbers.
    code = compile("\n" * (block.line - 1) + block.text, str(block.page), "exec")
    exec(code, {"__name__": "__main__"})


def run_console(block: Block) -> int:
    commands = 0
    for offset, line in enumerate(block.text.splitlines()):
        if not line.startswith("$ "):
            continue
        argv = shlex.split(line[2:], comments=True)
        where = f"{block.page.relative_to(ROOT)}:{block.line + offset}"
        assert argv and argv[0] == "tilec", f"{where}: runnable console lines run `tilec ...`"
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv[1:])
        assert code == 0, f"{where}: `{line[2:]}` exited {code}\n{err.getvalue()[-2000:]}"
        commands += 1
    assert commands, f"{block.where()}: a console run block without `$ tilec` lines"
    return commands


def run_yaml(block: Block) -> None:
    data = yaml.safe_load(block.text)
    cfgmod.parse_config(data, f"examples/{block.page.stem}.yaml")


@contextlib.contextmanager
def registries_restored():
    """Blocks may register operators (docs/architecture.md does): undo it afterwards."""
    saved = [(d, dict(d)) for d in (aten_ops.HANDLERS, exprs.EXPRS, reference.FNS)]
    try:
        yield
    finally:
        for d, copy in saved:
            d.clear()
            d.update(copy)


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    shutil.copytree(ROOT / "examples", tmp_path / "examples",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "build").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_runnable_blocks_use_a_runnable_language():
    for page in PAGES:
        for b in code_blocks(page):
            assert not b.run or b.lang in RUNNABLE, (
                f"{b.where()}: `{b.lang} run` is not runnable (use one of {RUNNABLE})")


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.run for b in code_blocks(p))],
                         ids=lambda p: p.name)
def test_runnable_blocks(page, scratch):
    with registries_restored():
        for b in code_blocks(page):
            if b.run:
                {"python": run_python, "console": run_console, "yaml": run_yaml}[b.lang](b)


def test_main_pages_have_runnable_blocks():
    for name in ("README.md", "docs/cli.md", "docs/architecture.md", "docs/engine-format.md"):
        assert any(b.run for b in code_blocks(ROOT / name)), name


def test_block_parser():
    page = ROOT / "README.md"
    blocks = code_blocks(page)
    assert blocks[0].lang == "" and "make demo" in blocks[0].text and not blocks[0].run
    assert {(b.lang, b.run) for b in blocks} >= {("python", True), ("console", True)}


# ---- README ---------------------------------------------------------------------------

def test_readme_starts_with_setup_and_keeps_the_picture_spot():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first = code_blocks(ROOT / "README.md")[0]
    assert "make demo" in first.text and "make test" in first.text
    assert text.index("make demo") < text.index("## ")
    assert "<!-- pictures: timeline and report -->" in text


def test_relative_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose(page)):
            if re.match(r"^[a-z]+:", target):
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


# ---- docs/model-yaml.md against tilec/compiler/config.py ------------------------------

def yaml_key_table() -> dict[str, dict[str, str]]:
    text = prose(DOCS / "model-yaml.md")
    rows = next(t for t in tables(text) if t and "key" in t[0] and "default" in t[0])
    out = {}
    for row in rows:
        (key,) = backticked(row["key"])
        assert key not in out, f"model-yaml.md: key {key} twice"
        out[key] = row
    return out


def test_model_yaml_keys_match_schema():
    keys = set(yaml_key_table())
    groups = {"": cfgmod.TOP_KEYS, "model.": cfgmod.MODEL_KEYS, "inputs[].": cfgmod.INPUT_KEYS,
              "target.roles.<role>.": cfgmod.ROLE_KEYS,   # before "target.": longest first
              "target.": cfgmod.TARGET_KEYS, "schedule.": cfgmod.SCHEDULE_KEYS}
    documented = {prefix: set() for prefix in groups}
    for key in keys:
        prefix = next((p for p in groups if p and key.startswith(p)), "")
        documented[prefix].add(key[len(prefix):])
    for prefix, schema in groups.items():
        assert documented[prefix] == set(schema), (
            f"docs/model-yaml.md documents {prefix or 'top-level '}keys "
            f"{sorted(documented[prefix])}, the schema has {sorted(schema)}")


def _default_cell_agrees(cell: str, default) -> bool:
    if default is None:
        return cell.startswith(("unset", "required"))
    first = backticked(cell)
    return bool(first) and first[0] == str(default)


def test_model_yaml_defaults_match_schema():
    rows = yaml_key_table()
    specs = {"target.": cfgmod.TargetSpec, "schedule.": cfgmod.ScheduleSpec,
             "inputs[].": cfgmod.InputSpec}
    expected = {"seed": 0, "model.max_seq_len": cfgmod.DEFAULT_MAX_SEQ_LEN,
                "target": "cpu", "dtype": None, "model.kwargs": "{}", "model.config": "{}",
                "schedule": "{}"}
    for prefix, spec in specs.items():
        for f in dataclasses.fields(spec):
            if f.default is not dataclasses.MISSING:
                expected[prefix + f.name] = f.default
            else:
                expected[prefix + f.name] = None    # no default: the page says "required"
    for key, default in expected.items():
        cell = rows[key]["default"]
        assert _default_cell_agrees(cell, default), (
            f"docs/model-yaml.md: {key} default {cell!r}, the code's is {default!r}")


def test_model_yaml_allowed_values_match_schema():
    rows = yaml_key_table()
    allowed = {"dtype": cfgmod.MODEL_DTYPES, "inputs[].dtype": tuple(cfgmod.INPUT_DTYPES),
               "target.name": tuple(TARGETS), "schedule.policy": cfgmod.POLICIES,
               "model.family": cfgmod.FAMILIES}
    for key, values in allowed.items():
        listed = set(backticked(rows[key]["type"]))
        assert listed == set(values), (
            f"docs/model-yaml.md: {key} lists {sorted(listed)}, the code allows {sorted(values)}")


# ---- docs/cli.md against tilec.cli.build_parser() -------------------------------------

def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def option_rows(section: str) -> dict[str, str]:
    """option string -> its table row (as text), from the section's option table."""
    rows = {}
    for table in tables(section):
        for row in table:
            if "option" not in row:
                continue
            text = " | ".join(row.values())
            for token in backticked(row["option"]):
                for opt in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", token):
                    rows[opt] = text
    return rows


def check_options(name: str, parser: argparse.ArgumentParser, section: str) -> None:
    rows = option_rows(section)
    actions = [a for a in parser._actions
               if a.option_strings and not isinstance(a, argparse._HelpAction)]
    in_parser = {s for a in actions for s in a.option_strings}
    assert set(rows) == in_parser, (
        f"docs/cli.md, {name}: documented {sorted(set(rows) - in_parser)} not in the parser; "
        f"in the parser but not documented {sorted(in_parser - set(rows))}")
    for a in actions:
        row = rows[a.option_strings[-1]]
        for choice in a.choices or ():
            assert f"`{choice}`" in row, (
                f"docs/cli.md, {name} {a.option_strings[-1]}: choice {choice} not listed")
        if a.default not in (None, False, argparse.SUPPRESS):
            assert f"`{a.default}`" in row, (
                f"docs/cli.md, {name} {a.option_strings[-1]}: default {a.default!r} not stated")
        if a.required:
            assert "required" in row, f"docs/cli.md, {name} {a.option_strings[-1]}: required"
    for a in parser._actions:
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction):
            metavar = a.metavar or a.dest.upper()
            assert metavar in section, f"docs/cli.md, {name}: positional {metavar}"


def test_cli_page_matches_parser():
    parser = build_parser()
    secs = sections(prose(DOCS / "cli.md"))
    commands = subparsers(parser)
    documented = {h.split()[1] for h in secs if h.startswith("tilec ")}
    assert documented == set(commands), (
        f"docs/cli.md documents commands {sorted(documented)}, tilec has {sorted(commands)}")
    check_options("global options", parser, secs["Global options"])
    for name, sub in commands.items():
        check_options(f"tilec {name}", sub, secs[f"tilec {name}"])


# ---- docs/engine-format.md against tilec/runtime/enginefile/ and tilec/ir/abi.py --------

def test_engine_format_page_matches_code():
    text = (DOCS / "engine-format.md").read_text(encoding="utf-8")
    assert f"format version **{engine_file.FORMAT_VERSION}**" in text
    assert f"`{engine_file.FORMAT}`" in text
    assert f"`{FIXED_FIELDS} + 2 * max_waits + {PREFETCH_FIELDS} + 1`" in text
    names = set()
    for table in tables(prose(DOCS / "engine-format.md")):
        for row in table:
            names.update(backticked(row.get("name", "")))
    assert {"tasks", "task_ids", "queue_start", "args", "pool.<name>"} <= names
