"""Shared machinery of the fuzz suites: seeded mutations of a file's bytes, and running one CLI call in a forked
child (timeout, memory limit, peak RSS), so that a hang, a crash or a runaway allocation is a failed case rather
than a dead test session.

Used by the fast deterministic suites (tests/test_fuzz_*.py) and by the long run in bench/fuzz.py."""
from __future__ import annotations

import json
import os
import random
import resource
import signal
import struct
import time
from dataclasses import dataclass

#: what a CLI call may take before it counts as a hang, and how much memory a case may add to the warm process
TIMEOUT_S = 30.0
MEM_LIMIT_BYTES = 3 << 30

_EXTREMES = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 2**63 - 1, 2**63, 2**64 - 1]


@dataclass
class Outcome:
    argv: list
    code: int | None          # exit code; None when the child was killed
    stderr: str
    signal: int | None = None
    timed_out: bool = False
    peak_rss_mb: float = 0.0  # the child's peak resident set (it starts from the warm parent's)
    traceback: str = ""

    def problem(self) -> str | None:
        """Why this outcome breaks the contract (exit 0, or exit 2 with one `mxtools: error:` line), or None."""
        if self.timed_out:
            return f"hang (> {TIMEOUT_S:.0f} s)"
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        if self.code not in (0, 2):
            return f"exit {self.code}: {self.stderr[-600:]}{self.traceback[-1500:]}"
        if self.code == 2:
            lines = self.stderr.strip().splitlines()
            if len(lines) != 1 or not lines[0].startswith("mxtools: error:"):
                return f"exit 2 without exactly one error line: {self.stderr[-600:]}"
        return None


def mutate(data: bytes, rng: random.Random, header_end: int | None = None) -> tuple[str, bytes]:
    """One seeded mutation of `data` (mostly inside its first `header_end` bytes): (what was done, new bytes)."""
    end = max(1, min(len(data), header_end or len(data)))
    kind = rng.choice(["flip", "bytes", "int", "truncate", "insert", "delete"])
    buf = bytearray(data)
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(end)
            buf[i] ^= 1 << rng.randrange(8)
    elif kind == "bytes":
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(end)] = rng.randrange(256)
    elif kind == "int":
        width = rng.choice([4, 8])
        i = rng.randrange(max(1, end - width))
        value = rng.choice(_EXTREMES) & ((1 << (8 * width)) - 1)
        buf[i:i + width] = value.to_bytes(width, "little")
    elif kind == "truncate":
        cut = rng.randrange(len(data)) if rng.random() < 0.5 else rng.randrange(end)
        return f"truncate@{cut}", bytes(buf[:cut])
    elif kind == "insert":
        i = rng.randrange(end)
        buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        i = rng.randrange(end)
        del buf[i:i + rng.randint(1, 16)]
    return kind, bytes(buf)


def set_field(data: bytes, offset: int, fmt: str, value) -> bytes:
    """`data` with the struct field `fmt` at `offset` replaced by `value` (a structured mutation)."""
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt):]


# GGUF value type id -> struct format of a scalar (8 = string, 9 = array)
_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q",
                12: "<d"}


def gguf_fields(data: bytes, strings_per_array: int = 3) -> list[tuple[str, int, str]]:
    """The header fields of a well-formed GGUF as (label, byte offset, struct format): the counts, every key's
    length, value type and scalar value, each array's element type and length (and its first string lengths or
    first value), and each tensor's name length, n_dims, dimensions, type id and data offset."""
    out, pos = [("version", 4, "<I"), ("n_tensors", 8, "<Q"), ("n_kv", 16, "<Q")], 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def skip_string(label: str | None) -> str:
        nonlocal pos
        n = struct.unpack_from("<Q", data, pos)[0]
        if label:
            out.append((label + ".len", pos, "<Q"))
        text, pos = data[pos + 8:pos + 8 + n].decode("utf-8", "replace"), pos + 8 + n
        return text

    for _ in range(n_kv):
        key = skip_string("key")
        out[-1] = (f"{key}.key_len", out[-1][1], "<Q")
        vtype = struct.unpack_from("<I", data, pos)[0]
        out.append((f"{key}.type", pos, "<I"))
        pos += 4
        if vtype == 8:
            skip_string(key)
        elif vtype == 9:
            elem, count = struct.unpack_from("<IQ", data, pos)
            out += [(f"{key}.elem_type", pos, "<I"), (f"{key}.count", pos + 4, "<Q")]
            pos += 12
            if elem == 8:
                for j in range(count):
                    skip_string(f"{key}[{j}]" if j < strings_per_array else None)
            else:
                out.append((f"{key}[0]", pos, _GGUF_SCALAR[elem]))
                pos += count * struct.calcsize(_GGUF_SCALAR[elem])
        else:
            out.append((key, pos, _GGUF_SCALAR[vtype]))
            pos += struct.calcsize(_GGUF_SCALAR[vtype])
    for _ in range(n_tensors):
        name = skip_string("tensor")
        out[-1] = (f"{name}.name_len", out[-1][1], "<Q")
        n_dims = struct.unpack_from("<I", data, pos)[0]
        out.append((f"{name}.n_dims", pos, "<I"))
        out += [(f"{name}.dim{d}", pos + 4 + 8 * d, "<Q") for d in range(n_dims)]
        pos += 4 + 8 * n_dims
        out += [(f"{name}.type", pos, "<I"), (f"{name}.offset", pos + 4, "<Q")]
        pos += 12
    return out


def mutate_field(data: bytes, field: tuple[str, int, str], rng: random.Random) -> tuple[str, bytes]:
    """One structured mutation of a header field: an extreme, a neighbour of its value, or (for a float) a
    non-finite or absurd number."""
    label, offset, fmt = field
    if fmt in ("<f", "<d"):
        value = rng.choice([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e30, -1e-30])
        return f"{label}={value}", set_field(data, offset, fmt, value)
    width = struct.calcsize(fmt)
    old = int.from_bytes(data[offset:offset + width], "little")
    value = rng.choice(_EXTREMES + [old + 1, old - 1, old * 2, old // 2, old + 2**32, rng.randrange(64)])
    value &= (1 << (8 * width)) - 1
    return f"{label}={value}", data[:offset] + value.to_bytes(width, "little") + data[offset + width:]


def run_isolated(argv: list, timeout: float = TIMEOUT_S, mem_limit: int = MEM_LIMIT_BYTES) -> Outcome:
    """Run `mxtools *argv` through the CLI's error boundary in a forked child of this (warm) process."""
    argv = [str(a) for a in argv]
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(rfd)
        _child(argv, wfd, mem_limit)
    os.close(wfd)
    deadline = time.monotonic() + timeout
    status = usage = None
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            os.close(rfd)
            return Outcome(argv, None, "", timed_out=True, peak_rss_mb=usage.ru_maxrss / 1024)
        time.sleep(0.01)
    payload = b""
    while chunk := os.read(rfd, 1 << 16):
        payload += chunk
    os.close(rfd)
    rss = usage.ru_maxrss / 1024
    if os.WIFSIGNALED(status):
        return Outcome(argv, None, "", signal=os.WTERMSIG(status), peak_rss_mb=rss)
    try:
        res = json.loads(payload or b"{}")
    except ValueError:
        res = {}
    # no result from the child (it died before reporting) is a failure, never a clean exit
    return Outcome(argv, res.get("code", 3), res.get("stderr", "child reported nothing"), peak_rss_mb=rss,
                   traceback=res.get("traceback", ""))


def _child(argv: list, wfd: int, mem_limit: int) -> None:
    code, stderr, tb = 3, "", ""
    try:
        _limit_memory(mem_limit)
        import traceback

        import torch
        torch.set_num_threads(1)  # tiny cases; one thread keeps a busy machine from stretching them past the timeout

        from click.testing import CliRunner

        from mxtools.cli import main
        result = CliRunner().invoke(main, argv)
        code, stderr = result.exit_code, result.stderr
        if result.exc_info and not isinstance(result.exception, SystemExit):
            tb = "".join(traceback.format_exception(*result.exc_info))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which judges it
        stderr = f"{type(exc).__name__}: {exc}"
    try:
        # short enough for the pipe's buffer: the parent reads only after the child has exited
        os.write(wfd, json.dumps({"code": code, "stderr": stderr[-4000:], "traceback": tb[-4000:]}).encode())
    finally:
        os._exit(0)


def _limit_memory(extra: int) -> None:
    """Cap the child's address space at what it has now plus `extra` bytes."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra, vm + extra))


def check_all(cases: list[tuple[str, list]]) -> tuple[list[str], float]:
    """Run each (label, argv) case; returns the failures (label: problem) and the worst peak RSS in MB."""
    failures, worst = [], 0.0
    for label, argv in cases:
        out = run_isolated(argv)
        worst = max(worst, out.peak_rss_mb)
        if (why := out.problem()) is not None:
            failures.append(f"{label}: {why}")
    return failures, worst


# pickle opcode -> struct format of its operand (a length, an integer, a memo index), for structured mutations
_PICKLE_OPERANDS = {"SHORT_BINUNICODE": "<B", "SHORT_BINBYTES": "<B", "BININT1": "<B", "BINGET": "<B",
                    "BINPUT": "<B", "LONG1": "<B", "BININT2": "<H", "BININT": "<I", "BINUNICODE": "<I",
                    "BINBYTES": "<I", "LONG_BINGET": "<I", "LONG_BINPUT": "<I", "LONG4": "<I", "BINUNICODE8": "<Q",
                    "BINBYTES8": "<Q", "FRAME": "<Q", "PROTO": "<B"}


def pickle_fields(data: bytes) -> list[tuple[str, int, str]]:
    """The operands of a well-formed pickle's opcodes as (label, byte offset, struct format): every length,
    integer and memo index (pickletools only lists the opcodes; nothing in the pickle is run)."""
    import pickletools
    return [(f"{op.name}@{pos}", pos + 1, _PICKLE_OPERANDS[op.name]) for op, _, pos in pickletools.genops(data)
            if op.name in _PICKLE_OPERANDS]


def pickle_spans(data: bytes, eager: int = 256) -> list[tuple[int, int]]:
    """The parts of a pickle that are not tensor data: every opcode with its operand, except the payload of a
    bytes object longer than `eager` (a tensor's raw data), of which only the opcode and its length count."""
    import pickletools
    ops = list(pickletools.genops(data))
    spans = []
    for (op, arg, pos), (_, _, nxt) in zip(ops, ops[1:] + [(None, None, len(data))]):
        if op.name in ("BINBYTES", "BINBYTES8", "SHORT_BINBYTES") and len(arg) > eager:
            nxt = pos + 1 + struct.calcsize(_PICKLE_OPERANDS[op.name])
        spans.append((pos, nxt))
    return spans
