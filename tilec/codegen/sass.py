"""Reading the compiled kernel: how each task function streams memory, from its SASS.

    sass = disassemble(cubin)                 # nvdisasm's text (Triton ships nvdisasm)
    for name, code in task_functions(sass).items():
        stream_facts(code, threads=128)       # async copies, stages, bytes in flight

The template says what the kernel means to do; ptxas decides what it does. A K loop
that Triton pipelined holds cp.async copies (LDGSTS) or TMA copies (UTMALDG) and waits
for all but N copy groups before it reads a stage (DEPBAR.LE SB0, N): N + 1 groups are
in flight when a chunk is awaited. A loop of plain loads (LDG) keeps in flight what its
scoreboards say: bytes issued and not yet waited for, simulated over two trips (what is
still pending at the back edge was carried into the next trip).

Adapted from the matvec study in the project's shared gpu-kit (matvec_variants.py),
which reads the same control bits.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# sm_90 control bits in the high word of each instruction: stall cycles (41-44), write
# scoreboard (46-48; 7 = none), wait mask (52-57)
_STALL, _WRITE_SB, _WAIT = (41, 0xF), (46, 0x7), (52, 0x3F)


@dataclass(frozen=True)
class Instr:
    addr: int
    text: str
    write_sb: int | None
    waits: frozenset[int]
    stall: int

    @property
    def opcode(self) -> str:
        return next(t for t in self.text.split() if not t.startswith("@"))


def nvidia_tool(name: str) -> str | None:
    """Path of a CUDA binary tool Triton ships (nvdisasm, cuobjdump), or None."""
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


def disassemble(cubin: bytes, hex_bits: bool = True) -> str | None:
    """nvdisasm's listing of a cubin (with each instruction's encoding when `hex_bits`,
    which `parse` needs), or None when nvdisasm is not there or fails."""
    tool = nvidia_tool("nvdisasm")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            proc = subprocess.run([tool, "-c"] + (["-hex"] if hex_bits else []) + [f.name],
                                  capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            return None
    return proc.stdout if proc.returncode == 0 else None


def task_functions(listing: str) -> dict[int, str]:
    """Each task function's part of the listing, by opcode (`task_N` -> N)."""
    out: dict[int, str] = {}
    current, lines = None, []
    for line in listing.splitlines():
        m = re.match(r"\s*\.type\s+(\S+),@function", line)
        if m:
            if current is not None:
                out[current] = "\n".join(lines)
            t = re.search(r"_task_(\d+)_", m.group(1))
            current, lines = (int(t.group(1)) if t else None), []
            continue
        if current is not None:
            lines.append(line)
    if current is not None:
        out[current] = "\n".join(lines)
    return out


def parse(code: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions (from `nvdisasm -c -hex`) and the address of each label."""
    rows: list[Instr] = []
    labels: dict[str, int] = {}
    pending, label = None, None
    for line in code.splitlines():
        s = line.strip()
        if s.endswith(":") and not s.startswith("/*"):
            label = s[:-1]
            continue
        m = re.match(r"/\*([0-9a-f]{4,})\*/\s+(.*?);\s*/\* 0x[0-9a-f]{16} \*/", s)
        if m:
            pending = (int(m.group(1), 16), m.group(2).strip())
            if label:
                labels[label] = pending[0]
                label = None
            continue
        m = re.match(r"/\* 0x([0-9a-f]{16}) \*/", s)
        if m and pending:
            hi = int(m.group(1), 16)
            wr = (hi >> _WRITE_SB[0]) & _WRITE_SB[1]
            wait = (hi >> _WAIT[0]) & _WAIT[1]
            rows.append(Instr(pending[0], pending[1], None if wr == 7 else wr,
                              frozenset(i for i in range(6) if wait >> i & 1),
                              (hi >> _STALL[0]) & _STALL[1]))
            pending = None
    return rows, labels


def _width(opcode: str) -> int:
    """Bytes one thread moves with a load or async copy instruction."""
    for tag, b in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if tag in opcode:
            return b
    return 4


def _is_copy(opcode: str) -> bool:
    return opcode.startswith(("LDG.", "LDGSTS", "UTMALDG")) and not opcode.startswith("LDGDEPBAR")


def loops(rows: list[Instr], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(first, last) instruction index of every loop: a branch back to a label."""
    index = {r.addr: i for i, r in enumerate(rows)}
    out = []
    for i, r in enumerate(rows):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", r.text)
        if m and m.group(1) in labels and labels[m.group(1)] < r.addr:
            out.append((index[labels[m.group(1)]], i))
    return out


def _zero_fill(r: Instr) -> bool:
    """A cp.async whose source predicate is constant false only writes zeros (Triton's
    pipeliner issues such copies for ring stages past a loop's last trip)."""
    return r.opcode.startswith("LDGSTS") and r.text.rstrip().endswith(", !PT")


# The constant-bank word a function's default global memory descriptor is loaded from
# (`ULDC.64 URn, c[0x0][0x208]`); a copy whose `desc[URn]` was built otherwise carries an
# L2 cache policy, which tilec gives weight loads only (evict-first: read once per step)
_DEFAULT_DESCRIPTOR = "c[0x0][0x208]"


def policy_copies(rows: list[Instr]) -> frozenset[int]:
    """Addresses of the copies (cp.async or plain loads) whose memory descriptor carries
    an L2 cache policy: by the last write to the descriptor's uniform register before the
    copy, in listing order (a function builds its descriptors once, before its loops)."""
    default: set[int] = set()
    out = set()
    for r in rows:
        m = re.search(r"desc\[UR(\d+)\]", r.text)
        if m and _is_copy(r.opcode) and int(m.group(1)) not in default:
            out.add(r.addr)
        d = re.match(r"(?:@!?U?P\w+\s+)?(\S+)\s+UR(\d+)\b", r.text)
        if d and d.group(1).startswith("U"):
            n, pair = int(d.group(2)), ".64" in d.group(1)
            written = {n, n + 1} if pair else {n}
            if d.group(1) == "ULDC.64" and _DEFAULT_DESCRIPTOR in r.text:
                default |= written
            else:
                default -= written
    return frozenset(out)


def _simulate(trace: list[Instr], threads: int, policy: frozenset[int] = frozenset()) -> dict:
    """Walk `trace` (a function's instructions, its hot loop repeated) keeping the copies
    in flight: cp.async bytes in commit groups (LDGDEPBAR closes one, DEPBAR.LE SB0, N
    waits until N remain), plain loads by scoreboard (an instruction waiting on one
    retires every load it tracks). Per CTA: the most cp.async bytes outstanding at a
    wait (the ring's depth), the groups outstanding then and the groups issued between
    two waits, and the most plain-load bytes outstanding; and the most cp.async bytes
    outstanding at a wait of the copies at the addresses `policy` (policy_copies)."""
    groups: list[tuple[int, int]] = []    # (bytes, policy bytes) of each commit group
    open_bytes = open_policy = 0
    ring = ring_groups = ring_policy = 0
    issued_since_wait, per_wait = 0, None
    pending: dict[int, list[int]] = {}
    plain = plain_peak = 0
    for r in trace:
        op = r.opcode
        for sb in r.waits:
            plain -= sum(pending.pop(sb, []))
        if op.startswith("LDGSTS") and not _zero_fill(r):
            open_bytes += _width(op) * threads
            open_policy += _width(op) * threads if r.addr in policy else 0
        elif op.startswith("LDGDEPBAR"):
            groups.append((open_bytes, open_policy))
            open_bytes = open_policy = 0
            issued_since_wait += 1
        elif op.startswith("DEPBAR"):
            m = re.search(r"DEPBAR\.LE\s+SB0,\s*0x([0-9a-f]+)", r.text)
            if m:
                if sum(g[0] for g in groups) > ring:
                    ring, ring_groups = sum(g[0] for g in groups), len(groups)
                ring_policy = max(ring_policy, sum(g[1] for g in groups))
                if issued_since_wait:   # the fewest a wait follows: one stage's groups
                    per_wait = min(per_wait or issued_since_wait, issued_since_wait)
                issued_since_wait = 0
                del groups[:max(0, len(groups) - int(m.group(1), 16))]
        elif op.startswith("LDG.") and r.write_sb is not None:
            b = _width(op) * threads
            pending.setdefault(r.write_sb, []).append(b)
            plain += b
            plain_peak = max(plain_peak, plain)
    return {"ring": ring, "ring_groups": ring_groups, "groups_per_wait": per_wait or 1,
            "plain": plain_peak, "ring_policy": ring_policy}


def stream_facts(code: str, threads: int) -> dict:
    """How one function streams: {async_copy ("tma" | "cp.async" | "none"), stages
    (chunks a ring holds in flight at a wait, plus the one being read: Triton's
    num_stages; 1 without a ring), bytes_in_flight (per CTA: the most cp.async bytes
    outstanding when a chunk is awaited, else the most plain-load bytes outstanding),
    weight_bytes_in_flight (of those, a ring's copies with an L2 cache policy: tilec's
    evict-first weight loads; None without a ring), copy_op (the ring's most frequent
    copy instruction, e.g. LDGSTS.E.BYPASS.128: a 16-byte cp.async; without a ring, the
    hot loop's), copy_bytes_per_trip and loop_instructions of its hot loop (the innermost
    loop that copies the most bytes asynchronously, else the most bytes; None when ptxas
    unrolled every loop), barriers}, or {} when the function copies
    nothing from global memory in a loop or a ring. TMA copies are named but not measured
    (no task kind uses them)."""
    rows, labels = parse(code)
    if not any(_is_copy(r.opcode) for r in rows):
        return {}
    all_loops = loops(rows, labels)
    hot, hot_bytes, hot_key = None, 0, (0, 0)
    for lo, hi in all_loops:
        if any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in all_loops):
            continue   # not innermost
        copies = [r.opcode for r in rows[lo:hi + 1] if _is_copy(r.opcode) and not _zero_fill(r)]
        moved = sum(_width(o) for o in copies)
        # a ring's loop before a loop of plain loads that moves more (a norm's row sum)
        key = (sum(_width(o) for o in copies if o.startswith("LDGSTS")), moved)
        if key > hot_key:
            hot, hot_bytes, hot_key = (lo, hi), moved, key
    trace = rows if hot is None else rows[:hot[0]] + rows[hot[0]:hot[1] + 1] * 3 + rows[hot[1] + 1:]
    sim = _simulate(trace, threads, policy_copies(rows))
    ops = [r.opcode for r in rows]
    tma = any(o.startswith("UTMALDG") for o in ops)
    # the copy instruction of the ring (or, without one, of the hot loop)
    ring_copies = [r.opcode for r in rows if r.opcode.startswith("LDGSTS") and not _zero_fill(r)]
    hot_copies = Counter(ring_copies if sim["ring"] else
                         [r.opcode for r in rows[hot[0]:hot[1] + 1] if _is_copy(r.opcode)]
                         if hot else [])
    facts = {"async_copy": "tma" if tma else "cp.async" if sim["ring"] else "none",
             "barriers": sum(o.startswith("BAR") for o in ops),
             "copy_op": hot_copies.most_common(1)[0][0] if hot_copies else None,
             "copy_bytes_per_trip": hot_bytes * threads if hot else None,
             "loop_instructions": hot[1] - hot[0] + 1 if hot else None}
    if sim["ring"]:
        per_stage = max(1, sim["groups_per_wait"])
        facts.update(stages=sim["ring_groups"] // per_stage + 1, bytes_in_flight=sim["ring"],
                     weight_bytes_in_flight=sim["ring_policy"])
    elif tma:
        facts.update(stages=None, bytes_in_flight=None, weight_bytes_in_flight=None)
    elif hot is None:
        return {}
    else:
        facts.update(stages=1, bytes_in_flight=sim["plain"], weight_bytes_in_flight=None)
    return facts


def kernel_stream_facts(cubin: bytes, threads: int) -> dict[int, dict] | None:
    """stream_facts of every task function of a compiled tilec kernel, by opcode; None
    when the cubin cannot be disassembled here."""
    listing = disassemble(cubin)
    if listing is None:
        return None
    return {op: stream_facts(code, threads) for op, code in task_functions(listing).items()}
