"""A restricted pickle machine: it interprets the opcodes of a pickle itself (those of protocols 0 to 4 that a
state dict uses; tensor data needs protocol 3 or 4, whose bytes opcodes carry it raw) and never calls
Python's unpickler, so no global it meets is imported and no code in the file runs.

It knows six globals, each replaced by an inert marker: numpy's array reconstruction (`_reconstruct` under both
`numpy.core.multiarray` and `numpy._core.multiarray`), `numpy.ndarray`, `numpy.dtype`, `collections.OrderedDict`
and `builtins.tuple` (Paddle pickles a tensor outside a plain state dict as `tuple((name, ndarray))`). Calling a
marker (REDUCE) builds a plain value: an `ArrayStub` the following BUILD fills with shape, dtype and data, a
`DtypeStub`, a dict or a tuple. Any other global is refused as soon as it is read (UnsafePickleError), and so
are the opcodes that build arbitrary objects (INST, OBJ, NEWOBJ, persistent ids, extension codes, out-of-band
buffers).

Bytes objects longer than EAGER_BYTES are not read: they become a `Blob` (offset and length in the file), so a
tensor's data stays on disk until it is loaded, and parsing a shard costs memory in its opcodes, not its data.
Every length is checked against the bytes left in the file before anything is read, and the stack, the memo
and the number of opcodes are bounded, so a damaged or hostile pickle ends in a FormatError within bounded
time and memory. Nothing is traversed recursively (deep nesting costs nothing).
"""
from __future__ import annotations

import codecs
import os
import struct
from dataclasses import dataclass

from ..core.errors import FormatError, UnsafePickleError

EAGER_BYTES = 256  # bytes objects up to this long are read; longer ones stay in the file as a Blob
MAX_TEXT = 1 << 20  # a string (a tensor name) of at most 1 MiB
MAX_STACK = 1 << 18  # stack entries, marks and memo entries, each (Mixtral-8x7B's 995 tensors: about 15k memo)
MAX_OPS = 1 << 20  # opcodes in one pickle (Mixtral-8x7B's whole state dict: about 50k); bounds the time
_CHUNK = 1 << 16

ALLOWED = {("numpy.core.multiarray", "_reconstruct"): "reconstruct",
           ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
           ("numpy", "ndarray"): "ndarray", ("numpy", "dtype"): "dtype",
           ("collections", "OrderedDict"): "ordered_dict", ("builtins", "tuple"): "tuple"}


@dataclass(frozen=True)
class Marker:
    """An admitted global (one of ALLOWED's values), never the object it names."""
    kind: str


@dataclass(frozen=True)
class Blob:
    """A bytes object left in the file: `nbytes` bytes from `offset`."""
    offset: int
    nbytes: int


@dataclass
class DtypeStub:
    code: str  # numpy's type code without byte order, e.g. "f4", "u2"
    byteorder: str = "|"


@dataclass
class ArrayStub:
    """numpy's `_reconstruct(ndarray, (0,), b"b")`, filled in by BUILD with its state."""
    shape: tuple | None = None
    dtype: DtypeStub | None = None
    fortran: bool = False
    data: bytes | Blob | None = None


def _show(x) -> str:
    """A value in an error line: a short printable string as it is, else its repr (never a newline), else its
    type."""
    if isinstance(x, str):
        return x if x.isprintable() and len(x) <= 80 else repr(x)[:80]
    return type(x).__name__


class _Input:
    """Sequential reads of a file by offset, in chunks; a read past the end is a truncated file."""

    def __init__(self, fd: int, size: int, path: str):
        self.fd, self.size, self.path = fd, size, path
        self.pos, self.buf, self.buf_at = 0, b"", 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise FormatError(f"pickle is truncated or corrupt: {what} of {n} bytes at byte {self.pos} runs past "
                              f"the end ({self.size} bytes)", file=self.path)

    def read(self, n: int, what: str = "data") -> bytes:
        self.need(n, what)
        start = self.pos - self.buf_at
        if start + n > len(self.buf):
            self.buf, self.buf_at, start = os.pread(self.fd, max(n, _CHUNK), self.pos), self.pos, 0
            if len(self.buf) < n:
                raise FormatError(f"unexpected end of file at byte {self.pos}", file=self.path)
        self.pos += n
        return self.buf[start:start + n]

    def skip(self, n: int, what: str) -> int:
        self.need(n, what)
        at, self.pos = self.pos, self.pos + n
        return at

    def line(self, limit: int = 256) -> bytes:
        """A text operand (protocol 0 and 1, GLOBAL): the bytes before the next newline, at most `limit`."""
        start = self.pos - self.buf_at
        end = self.buf.find(b"\n", start, start + limit + 1)
        if end < 0:
            self.buf, self.buf_at, start = os.pread(self.fd, max(limit + 1, _CHUNK), self.pos), self.pos, 0
            end = self.buf.find(b"\n", 0, limit + 1)
        if end < 0:
            raise FormatError(f"corrupt pickle: a text operand over {limit} bytes, or without its newline, at "
                              f"byte {self.pos}", file=self.path)
        self.pos += end + 1 - start
        return self.buf[start:end]


class Machine:
    """Runs one pickle from a file descriptor and returns its value (plain dicts, lists, tuples, strings, numbers,
    markers, stubs and blobs only)."""

    def __init__(self, fd: int, size: int, path: str):
        self.inp, self.path = _Input(fd, size, path), path
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}

    def run(self):
        ops = _OPS
        for _ in range(MAX_OPS):
            at = self.inp.pos
            code = self.inp.read(1, "an opcode")[0]
            op = ops.get(code)
            if op is None:
                raise self._bad_opcode(code, at)
            if op(self) is _STOP:
                return self._result()
        raise FormatError(f"pickle has over {MAX_OPS} opcodes (a state dict of arrays needs a few per tensor)",
                          file=self.path)

    def _bad_opcode(self, code: int, at: int) -> Exception:
        if code in _UNSAFE:
            return UnsafePickleError(f"refused: the pickle uses opcode {_UNSAFE[code]} at byte {at}, which builds "
                                     "arbitrary objects (a state dict holds only numpy arrays)", file=self.path)
        return FormatError(f"corrupt pickle: unknown or unsupported opcode 0x{code:02x} at byte {at}",
                           file=self.path)

    def _result(self):
        if len(self.stack) != 1 or self.marks:
            raise FormatError(f"corrupt pickle: STOP with {len(self.stack)} values on the stack", file=self.path)
        return self.stack[0]

    # ---- the stack
    def push(self, value) -> None:
        if len(self.stack) >= MAX_STACK:
            raise FormatError(f"pickle stack over {MAX_STACK} values", file=self.path)
        self.stack.append(value)

    def pop(self):
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise FormatError(f"corrupt pickle: stack underflow at byte {self.inp.pos}", file=self.path)
        return self.stack.pop()

    def top(self):
        value = self.pop()
        self.stack.append(value)
        return value

    def mark(self) -> None:
        if len(self.marks) >= MAX_STACK:
            raise FormatError("pickle nests too deeply", file=self.path)
        self.marks.append(len(self.stack))

    def pop_mark(self) -> list:
        if not self.marks:
            raise FormatError(f"corrupt pickle: no MARK before byte {self.inp.pos}", file=self.path)
        at = self.marks.pop()
        items = self.stack[at:]
        del self.stack[at:]
        return items

    # ---- operands
    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.inp.read(n, what), "little")

    def text(self, n: int) -> str:
        if n > MAX_TEXT:
            raise FormatError(f"pickle string of {n} bytes (over {MAX_TEXT}) at byte {self.inp.pos}", file=self.path)
        try:
            return self.inp.read(n, "a string").decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"corrupt pickle: a string that is not UTF-8 before byte {self.inp.pos}",
                              file=self.path) from None

    def data(self, n: int):
        if n <= EAGER_BYTES:
            return self.inp.read(n, "a bytes object")
        return Blob(self.inp.skip(n, "a bytes object"), n)

    def global_(self, module, name) -> Marker:
        kind = ALLOWED.get((module, name)) if isinstance(module, str) and isinstance(name, str) else None
        if kind is None:
            raise UnsafePickleError(f"refused: the pickle calls {_show(module)}.{_show(name)} (only numpy arrays, "
                                    "dicts and tuples are admitted)", file=self.path)
        return Marker(kind)

    def memo_put(self, index: int) -> None:
        if len(self.memo) >= MAX_STACK and index not in self.memo:
            raise FormatError(f"pickle memo over {MAX_STACK} entries", file=self.path)
        self.memo[index] = self.top()

    def memo_get(self, index: int) -> None:
        if index not in self.memo:
            raise FormatError(f"corrupt pickle: memo entry {index} read before it is written", file=self.path)
        self.push(self.memo[index])

    # ---- calls and state
    def reduce(self) -> None:
        args, fn = self.pop(), self.pop()
        if not isinstance(fn, Marker) or not isinstance(args, tuple):
            raise FormatError(f"corrupt pickle: REDUCE calls a {_show(fn)} with {_show(args)} at byte "
                              f"{self.inp.pos}", file=self.path)
        value = _CALLS[fn.kind](args)
        if value is None:
            raise FormatError(f"corrupt pickle: {fn.kind} called with arguments it never takes in a state dict "
                              f"(at byte {self.inp.pos})", file=self.path)
        self.push(value)

    def build(self) -> None:
        state, obj = self.pop(), self.top()
        done = (_dtype_state(obj, state) if isinstance(obj, DtypeStub)
                else _array_state(obj, state) if isinstance(obj, ArrayStub) else False)
        if not done:
            raise FormatError(f"corrupt pickle: BUILD of a {_show(obj)} with a {_show(state)} state at byte "
                              f"{self.inp.pos}", file=self.path)

    def set_items(self, items: list) -> None:
        d = self.top()
        if not isinstance(d, dict) or len(items) % 2:
            raise FormatError(f"corrupt pickle: SETITEM(S) on a {_show(d)} at byte {self.inp.pos}", file=self.path)
        for key, value in zip(items[::2], items[1::2]):
            if type(key) not in (str, int):
                raise FormatError(f"corrupt pickle: a dict key that is a {_show(key)}", file=self.path)
            d[key] = value

    def append(self, items: list) -> None:
        lst = self.top()
        if not isinstance(lst, list):
            raise FormatError(f"corrupt pickle: APPEND(S) on a {_show(lst)} at byte {self.inp.pos}", file=self.path)
        lst.extend(items)


def _reconstruct(args: tuple):
    return ArrayStub() if len(args) == 3 and args[0] == Marker("ndarray") else None


def _dtype(args: tuple):
    ok = 1 <= len(args) <= 3 and isinstance(args[0], str) and len(args[0]) <= 8
    return DtypeStub(args[0]) if ok and all(type(a) is bool for a in args[1:]) else None


def _ordered_dict(args: tuple):
    if not args:
        return {}
    pairs = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else None
    if pairs is None or not all(isinstance(p, tuple) and len(p) == 2 and type(p[0]) is str for p in pairs):
        return None
    return dict(pairs)


def _tuple(args: tuple):
    if not args:
        return ()
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else None


_CALLS = {"reconstruct": _reconstruct, "dtype": _dtype, "ordered_dict": _ordered_dict, "tuple": _tuple,
          "ndarray": lambda args: None}


def _dtype_state(d: DtypeStub, state) -> bool:
    """numpy's dtype state (version, byte order, subarray, names, fields, itemsize, alignment, flags): only
    plain scalar types (no subarray, no fields)."""
    if not (isinstance(state, tuple) and 8 <= len(state) <= 9 and isinstance(state[1], str)):
        return False
    if state[2] is not None or state[3] is not None or state[4] is not None:
        return False
    d.byteorder = state[1]
    return True


def _array_state(a: ArrayStub, state) -> bool:
    """ndarray's state (version, shape, dtype, Fortran order, raw data), set once."""
    if a.shape is not None or not (isinstance(state, tuple) and len(state) == 5):
        return False
    _, shape, dtype, fortran, data = state
    if not (isinstance(shape, tuple) and len(shape) <= 32 and all(type(n) is int and n >= 0 for n in shape)):
        return False
    if not (isinstance(dtype, DtypeStub) and type(fortran) is bool and isinstance(data, (bytes, Blob))):
        return False
    a.shape, a.dtype, a.fortran, a.data = shape, dtype, fortran, data
    return True


# ---- the opcode table

_STOP = object()


def _long(m: Machine, n: int):
    if n < 0 or n > 64:
        raise FormatError(f"pickle integer of {n} bytes (over 64) at byte {m.inp.pos}", file=m.path)
    m.push(int.from_bytes(m.inp.read(n, "an integer"), "little", signed=True))


def _global(m: Machine):
    module, name = m.inp.line().decode("utf-8", "replace"), m.inp.line().decode("utf-8", "replace")
    if (module, name) == ("_codecs", "encode"):
        raise FormatError("a pickle of protocol 2 or older (bytes stored as text through _codecs.encode), which "
                          "mxtools does not read: save it again with paddle.save(..., protocol=4)", file=m.path)
    m.push(m.global_(module, name))


def _stack_global(m: Machine):
    name, module = m.pop(), m.pop()
    m.push(m.global_(module, name))


def _frame(m: Machine):
    m.inp.need(m.uint(8, "a frame length"), "a frame")


def _proto(m: Machine):
    if m.inp.read(1, "the protocol")[0] > 5:
        raise FormatError("not a pickle (protocol above 5)", file=m.path)


def _pop(m: Machine):
    if m.marks and len(m.stack) == m.marks[-1]:
        m.marks.pop()
    else:
        m.pop()


def _tuple_n(n: int):
    def op(m: Machine):
        items = [m.pop() for _ in range(n)][::-1]
        m.push(tuple(items))
    return op


def _dict(m: Machine):
    items = m.pop_mark()
    m.push({})
    m.set_items(items)


def _text_value(m: Machine, kind: str):
    """Protocol 0's values written as a line of text: INT, LONG, FLOAT, STRING (quoted), UNICODE."""
    raw = m.inp.line(MAX_TEXT)
    try:
        if kind == "int":  # protocol 0 writes booleans as INT 01 / 00
            return raw == b"01" if raw in (b"00", b"01") else int(raw.rstrip(b"L"))
        if kind == "float":
            return float(raw)
        if kind == "unicode":
            return raw.decode("raw_unicode_escape")
        if len(raw) < 2 or raw[:1] != raw[-1:] or raw[:1] not in b"'\"":
            raise ValueError("a STRING operand without its quotes")
        return codecs.escape_decode(raw[1:-1])[0].decode("ascii")
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"corrupt pickle: a {kind} text operand that does not parse, before byte {m.inp.pos}",
                          file=m.path) from None


def _text_op(kind: str):
    return lambda m: m.push(_text_value(m, kind))


def _line_index(m: Machine) -> int:
    raw = m.inp.line()
    if not raw.isdigit():
        raise FormatError(f"corrupt pickle: a memo index that is no number, before byte {m.inp.pos}", file=m.path)
    return int(raw)


def _sized(make, width: int):
    """An opcode whose operand is a `width`-byte length followed by that many bytes, made into a value by
    `make(machine, length)`."""
    return lambda m: m.push(make(m, m.uint(width, "a length")))


def _memo(action, width: int):
    return lambda m: action(m, m.uint(width, "a memo index"))


_OPS = {
    0x80: _proto, 0x95: _frame, ord("."): lambda m: _STOP,
    ord("("): Machine.mark, ord("0"): _pop, ord("1"): lambda m: m.pop_mark(), ord("2"): lambda m: m.push(m.top()),
    ord("N"): lambda m: m.push(None), 0x88: lambda m: m.push(True), 0x89: lambda m: m.push(False),
    ord("K"): lambda m: m.push(m.uint(1, "an integer")), ord("M"): lambda m: m.push(m.uint(2, "an integer")),
    ord("J"): lambda m: m.push(struct.unpack("<i", m.inp.read(4, "an integer"))[0]),
    0x8A: lambda m: _long(m, m.uint(1, "a length")), 0x8B: lambda m: _long(m, m.uint(4, "a length")),
    ord("G"): lambda m: m.push(struct.unpack(">d", m.inp.read(8, "a float"))[0]),
    0x8C: _sized(Machine.text, 1), ord("X"): _sized(Machine.text, 4), 0x8D: _sized(Machine.text, 8),
    ord("C"): _sized(Machine.data, 1), ord("B"): _sized(Machine.data, 4), 0x8E: _sized(Machine.data, 8),
    ord(")"): lambda m: m.push(()), ord("t"): lambda m: m.push(tuple(m.pop_mark())),
    0x85: _tuple_n(1), 0x86: _tuple_n(2), 0x87: _tuple_n(3),
    ord("]"): lambda m: m.push([]), ord("l"): lambda m: m.push(m.pop_mark()),
    ord("a"): lambda m: m.append([m.pop()]), ord("e"): lambda m: m.append(m.pop_mark()),
    ord("}"): lambda m: m.push({}), ord("d"): _dict,
    ord("s"): lambda m: m.set_items([*reversed([m.pop(), m.pop()])]), ord("u"): lambda m: m.set_items(m.pop_mark()),
    ord("c"): _global, 0x93: _stack_global, ord("R"): Machine.reduce, ord("b"): Machine.build,
    ord("q"): _memo(Machine.memo_put, 1), ord("r"): _memo(Machine.memo_put, 4), 0x94: lambda m: m.memo_put(len(m.memo)),
    ord("h"): _memo(Machine.memo_get, 1), ord("j"): _memo(Machine.memo_get, 4),
    # protocol 0 and 1 (Python's own fallback; Paddle writes protocol 4)
    ord("I"): _text_op("int"), ord("L"): _text_op("int"), ord("F"): _text_op("float"), ord("S"): _text_op("string"),
    ord("V"): _text_op("unicode"), ord("p"): lambda m: m.memo_put(_line_index(m)),
    ord("g"): lambda m: m.memo_get(_line_index(m)),
}

# opcodes that build arbitrary objects or reach outside the pickle: refused as unsafe, not merely unsupported
_UNSAFE = {ord("i"): "INST", ord("o"): "OBJ", 0x81: "NEWOBJ", 0x92: "NEWOBJ_EX", ord("P"): "PERSID",
           ord("Q"): "BINPERSID", 0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4", 0x97: "NEXT_BUFFER",
           0x98: "READONLY_BUFFER"}
