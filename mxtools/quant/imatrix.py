"""Importance matrices: per input column, the mean squared activation a Linear sees, as llama.cpp's imatrix.

`compute_imatrix` runs the reference forward pass (mxtools.model.forward) over llama-imatrix's chunks
(mxtools/core/chunking.py, shared with `verify`) and sums x^2 per input column for every
matrix llama-imatrix collects: attention q/k/v/o, the router, and each expert's w1/w3/w2 over only the tokens
routed to it (a token routed to two experts counts once for each).

File format: the GGUF imatrix current llama.cpp writes and prefers (tools/imatrix/imatrix.cpp,
common/imatrix-loader.cpp): KV general.type "imatrix", imatrix.datasets (string array), imatrix.chunk_count
and imatrix.chunk_size (u32); per matrix, in name order, F32 tensors `<gguf name>.in_sum2` [n_mat, n_cols]
(sums of squares) and `<gguf name>.counts` [n_mat, 1] (tokens seen), n_mat = experts for the merged
`blk.i.ffn_*_exps.weight`, else 1. The legacy .dat file (int32 entry count; per entry name, ncall, nval,
float values = mean * ncall; then chunk count and dataset name) is read too, never written.

Normalisation is llama-quantize's, in float32: sums / count, and 1.0 for an expert that saw no token
(legacy files: values / ncall).
"""
from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

IM = gguf.Keys.IMatrix

from ..core import names
from ..core.chunking import chunk_tokens, with_bos
from ..core.errors import FormatError, ShapeError, reading
from ..core.spec import ModelSpec
from ..core.tensors import Checkpoint
from ..core.values import is_kind, meta_value
from ..io.atomic import atomic_output
from ..io.files import RawFile
from ..io.gguf_format import MAGIC
from ..io.gguf_reader import read_header
from ..io.gguf_tables import (
    IMATRIX_CHUNKS,
    IMATRIX_DATASET,
    IMATRIX_ENTRIES,
    IMATRIX_FILE,
    LEGACY_TABLE,
    TABLE,
)
from ..io.gguf_writer import GGUFStreamWriter
from ..model.forward import iter_layers, resolve_device

CHUNKS_PER_PASS = 32  # chunks run through a layer together: each layer is read once per pass

# observer kind -> the Linear kinds whose input it is (q, k, v share one input; so do w1 and w3)
OBSERVED = {"attn_q": ("attn_q", "attn_k", "attn_v"), "attn_output": ("attn_output",),
            "ffn_gate_inp": ("ffn_gate_inp",), "ffn_gate": ("ffn_gate", "ffn_up"), "ffn_down": ("ffn_down",)}


class ImatrixStat(NamedTuple):
    """Sum over tokens of x^2 per input column (float32 [n]) and the number of tokens summed."""
    sum_sq: torch.Tensor
    count: int


class Imatrix(dict):
    """canonical HF tensor name -> ImatrixStat, with the file's metadata as attributes."""

    def __init__(self, stats=(), chunk_size: int = 0, chunk_count: int = 0, datasets=(), legacy: bool = False,
                 entries: int = 0):
        super().__init__(stats)
        self.chunk_size, self.chunk_count = chunk_size, chunk_count
        self.datasets, self.legacy = list(datasets), legacy
        self.entries = entries  # entries in the file (a merged expert tensor is one), as llama-quantize counts
        self.path = None  # the file it was read from, if any

    def quantize_metadata(self, path) -> list[tuple[str, V, object]]:
        """The quantize.imatrix.* keys llama-quantize records in a GGUF quantized with this file (key, type, value)."""
        rows = [(IMATRIX_FILE, V.STRING, str(path)[:127])]
        if self.datasets:
            rows.append((IMATRIX_DATASET, V.STRING, str(self.datasets[0])[:127]))
        rows.append((IMATRIX_ENTRIES, V.UINT32, self.entries))
        if self.chunk_count > 0:
            rows.append((IMATRIX_CHUNKS, V.UINT32, self.chunk_count))
        return rows


class _Collector:
    """The forward-pass observer: accumulates float64 sums of squares on the activations' device."""

    def __init__(self, spec: ModelSpec):
        self.layer, self.sums, self.counts = 0, {}, {}
        for i in range(spec.n_layers):
            for key in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp"):
                self.counts[names.weight_name(key, i)] = 0
            for e in range(spec.n_experts):
                for key in ("ffn_gate", "ffn_up", "ffn_down"):
                    self.counts[names.weight_name(key, i, e)] = 0

    def __call__(self, kind: str, x: torch.Tensor, expert) -> None:
        flat = x.reshape(-1, x.shape[-1])
        sq = torch.sum(flat.float().square(), 0, dtype=torch.float64)  # squares in f32, as llama.cpp
        for key in OBSERVED[kind]:
            name = names.weight_name(key, self.layer, expert)
            self.sums[name] = self.sums[name] + sq if name in self.sums else sq
            self.counts[name] += flat.shape[0]

    def result(self, spec: ModelSpec) -> dict:
        stats = {}
        for name, count in self.counts.items():
            n = names.expected_shape(name, spec)[1]
            s = self.sums.get(name)
            stats[name] = ImatrixStat(torch.zeros(n) if s is None else s.float().cpu(), count)
        return stats


def compute_imatrix(ckpt: Checkpoint, tokens, *, ctx: int = 512, chunks: int | None = None, device="auto",
                    dtype: torch.dtype = torch.float32, bos_id: int | None = None, datasets=(),
                    progress=lambda n: None) -> Imatrix:
    """The importance matrix of `ckpt` over `tokens` (the whole text's token stream, BOS first, as llama-imatrix
    tokenizes it: `chunking.tokenize_file`).

    Chunks as llama-imatrix: len(tokens) // ctx pieces (at most `chunks`), each fed with BOS first. Every matrix
    gets an entry, an expert that saw no token one with count 0. `progress(k)` is called after each chunk pass.
    """
    if bos_id is None:
        bos_id = ckpt.tokenizer.bos_id if ckpt.tokenizer and ckpt.tokenizer.add_bos else None
    batch = with_bos(chunk_tokens(tokens, ctx, chunks), bos_id)
    dev = resolve_device(device)
    collect = _Collector(ckpt.spec)
    with torch.no_grad():
        for start in range(0, batch.shape[0], CHUNKS_PER_PASS):
            piece = batch[start:start + CHUNKS_PER_PASS]
            collect.layer = 0
            for i, _, _ in iter_layers(ckpt, piece, dev, dtype, observer=collect):
                collect.layer = i + 1  # the observer runs inside the next layer
            progress(piece.shape[0])
    return Imatrix(collect.result(ckpt.spec), ctx, batch.shape[0], datasets)


# ---- GGUF names ----

def _to_gguf(stats: dict) -> dict[str, list]:
    """canonical stats -> GGUF name -> per-matrix list of stats (experts in order, None where missing; every
    merged tensor padded to the largest expert count, since llama-quantize wants experts * columns values)."""
    out: dict[str, list] = {}
    merged = set()
    for name, stat in stats.items():
        if names.parse(name) is None:
            raise ShapeError(f"not a Mixtral tensor name: {name}")
        gname, expert = TABLE.to_layout(name)
        slots = out.setdefault(gname, [])
        k = 0 if expert is None else expert
        slots.extend([None] * (k + 1 - len(slots)))
        slots[k] = stat
        if expert is not None:
            merged.add(gname)
    n_experts = max((len(out[g]) for g in merged), default=1)
    for g in merged:
        out[g].extend([None] * (n_experts - len(out[g])))
    return out


def _to_canonical(gname: str) -> tuple[str, bool] | None:
    return TABLE.to_canonical(gname) or LEGACY_TABLE.to_canonical(gname)


# ---- writing ----

def save_imatrix(path, data: Imatrix | dict, chunk_size: int | None = None, chunk_count: int | None = None,
                 datasets=None, force: bool = True) -> Path:
    """Write `data` (canonical name -> ImatrixStat) as the GGUF imatrix file llama.cpp reads, atomically
    (force=False: refuse an existing file)."""
    chunk_size = getattr(data, "chunk_size", 0) if chunk_size is None else chunk_size
    chunk_count = getattr(data, "chunk_count", 0) if chunk_count is None else chunk_count
    datasets = list(getattr(data, "datasets", []) if datasets is None else datasets)
    entries = _to_gguf(data)
    with atomic_output(Path(path), False, force=force) as tmp:
        w = GGUFStreamWriter(tmp)
        w.add(gguf.Keys.General.TYPE, V.STRING, "imatrix")
        w.add(IM.DATASETS, V.ARRAY, datasets, V.STRING)
        w.add(IM.CHUNK_COUNT, V.UINT32, int(chunk_count))
        w.add(IM.CHUNK_SIZE, V.UINT32, int(chunk_size))
        blobs = []
        for gname in sorted(entries):  # llama.cpp writes in name order
            sums, counts = _stack(entries[gname], gname)
            w.plan(gname + ".in_sum2", _ggml_dims(sums.shape), Q.F32)
            w.plan(gname + ".counts", _ggml_dims(counts.shape), Q.F32)
            blobs += [sums, counts]
        w.write_header()
        for b in blobs:
            w.write(b)
        w.close()
    return Path(path)


def _ggml_dims(shape: tuple) -> tuple:
    """The shape GGUF records for a 2-D ggml tensor: ggml_n_dims drops outer dimensions of size 1."""
    return shape[1:] if shape[0] == 1 else shape


def _stack(slots: list, gname: str) -> tuple[np.ndarray, np.ndarray]:
    n = next(s.sum_sq.numel() for s in slots if s is not None)
    sums = np.zeros((len(slots), n), dtype=np.float32)
    counts = np.zeros((len(slots), 1), dtype=np.float32)
    for k, s in enumerate(slots):
        if s is None:
            continue
        if s.sum_sq.numel() != n:
            raise ShapeError(f"imatrix rows of {gname} differ in length ({s.sum_sq.numel()} vs {n})")
        sums[k] = s.sum_sq.detach().cpu().float().numpy()
        counts[k] = s.count
    return sums, counts


# ---- reading ----

def read_imatrix(path) -> Imatrix:
    """An imatrix file (GGUF or legacy .dat) as canonical name -> ImatrixStat, per expert for merged tensors.

    Legacy files hold mean * ncall per column and one ncall per matrix: they come back as (values, ncall),
    with `.legacy` set, so that normalize() divides as llama-quantize does. Sums must be finite and >= 0,
    counts whole numbers >= 0; anything else is a FormatError naming the file (and entry).
    """
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
    with reading(path):
        out = _read_gguf(path) if magic == MAGIC else _read_legacy(path)
    out.path = path
    return out


def _read_gguf(path: Path) -> Imatrix:
    raw = RawFile(path)
    try:
        meta, infos = read_header(raw)
        datasets = meta_value(meta, IM.DATASETS, list, path, [])
        if not all(is_kind(d, str) for d in datasets):
            raise FormatError("imatrix.datasets holds values that are not strings", file=path)
        out = Imatrix(chunk_size=meta_value(meta, IM.CHUNK_SIZE, int, path, 0),
                      chunk_count=meta_value(meta, IM.CHUNK_COUNT, int, path, 0), datasets=datasets)
        tensors = {t.name: t for t in infos}
        for tname, t in tensors.items():
            if tname.endswith(".in_sum2"):
                out.update(_gguf_entry(raw, tname[: -len(".in_sum2")], t, tensors))
                out.entries += 1
    finally:
        raw.close()
    return out


def _gguf_entry(raw: RawFile, gname: str, sums_info, tensors: dict) -> dict:
    counts_info = tensors.get(gname + ".counts")
    if counts_info is None or sums_info.qtype != Q.F32 or counts_info.qtype != Q.F32:
        raise FormatError("imatrix entry needs F32 .in_sum2 and .counts tensors", file=raw.path, tensor=gname)
    n_mat, n_sums = math.prod(counts_info.shape), math.prod(sums_info.shape)
    if n_sums % n_mat:
        raise FormatError(f"{n_sums} sums do not split into {n_mat} matrices", file=raw.path, tensor=gname)
    sums = raw.read_tensor(sums_info.offset, sums_info.nbytes, torch.float32, sums_info.shape, gname)
    counts = raw.read_tensor(counts_info.offset, counts_info.nbytes, torch.float32, counts_info.shape, gname)
    counts = _checked(sums, counts.reshape(-1), raw.path, gname)
    sums = sums.reshape(n_mat, -1)
    return _entries(gname, [ImatrixStat(sums[k].clone(), int(counts[k])) for k in range(n_mat)])


def _checked(sums: torch.Tensor, counts: torch.Tensor, path, gname: str) -> torch.Tensor:
    """`counts` if they are whole numbers >= 0 and the sums of squares finite and >= 0; else a FormatError."""
    if not bool(torch.all(torch.isfinite(sums) & (sums >= 0))):
        raise FormatError("sums of squares must be finite and >= 0", file=path, tensor=gname)
    if not bool(torch.all(torch.isfinite(counts) & (counts >= 0) & (counts < 2**53))):
        raise FormatError("token counts must be finite and >= 0", file=path, tensor=gname)
    return counts.double().round()


def _entries(gname: str, stats: list[ImatrixStat]) -> dict:
    """GGUF-named per-matrix stats -> canonical names; names of other architectures are skipped."""
    hit = _to_canonical(gname)
    if hit is None:
        return {}
    canonical, stacked = hit
    if not stacked:
        return {canonical: stats[0]}
    return {canonical.replace("{e}", str(e)): s for e, s in enumerate(stats)}


def _read_legacy(path: Path) -> Imatrix:
    """llama.cpp's legacy .dat: i32 entry count; per entry i32 name length, name, i32 ncall, i32 nval, nval
    f32; then optionally i32 chunk count. Every length is checked against the bytes left before it is used."""
    data = path.read_bytes()

    def fail(message: str, entry=None):
        raise FormatError(f"neither a GGUF nor a legacy imatrix file ({message})", file=path, tensor=entry)

    def ints(pos: int, k: int) -> tuple:
        if pos + 4 * k > len(data):
            fail(f"truncated at byte {pos}")
        return struct.unpack_from(f"<{k}i", data, pos)

    (n,), pos, raw = ints(0, 1), 4, {}
    if not 1 <= n <= len(data) // 12:
        fail(f"entry count {n}")
    for _ in range(n):
        (ln,) = ints(pos, 1)
        if not 1 <= ln <= len(data) - pos - 4:
            fail(f"name length {ln} at byte {pos}")
        gname = data[pos + 4: pos + 4 + ln].decode("utf-8", errors="replace")
        ncall, nval = ints(pos + 4 + ln, 2)
        pos += 12 + ln
        if ncall < 0 or not 1 <= nval <= (len(data) - pos) // 4 or gname in raw:
            fail(f"ncall {ncall}, nval {nval}" if gname not in raw else "stored twice", gname)
        vals = torch.from_numpy(np.frombuffer(data, "<f4", nval, pos).copy())
        _checked(vals, torch.tensor([float(ncall)]), path, gname)
        raw[gname] = (vals, ncall)
        pos += 4 * nval
    out = Imatrix(legacy=True, entries=len(raw))
    if pos + 4 <= len(data):
        out.chunk_count = max(0, ints(pos, 1)[0])
    n_experts = _legacy_expert_count(raw, path)
    for gname, (vals, ncall) in raw.items():
        n_mat = n_experts if (_to_canonical(gname) or ("", False))[1] else 1
        if len(vals) % n_mat:
            fail(f"{len(vals)} values do not split into {n_mat} experts", gname)
        out.update(_entries(gname, [ImatrixStat(v.clone(), ncall) for v in vals.reshape(n_mat, -1)]))
    return out


def _legacy_expert_count(raw: dict, path) -> int:
    """A legacy file keeps a merged expert tensor as one flat vector: the expert count is the length of an
    ffn_gate_exps entry over the model width (the router's or attn_q's input length)."""
    width = next((len(v) for g, (v, _) in raw.items() if g.endswith(("ffn_gate_inp.weight", "attn_q.weight"))),
                 None)
    gates = [len(v) for g, (v, _) in raw.items() if g.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight"))]
    if not gates:
        return 1
    if width is None or gates[0] % width:
        raise FormatError("legacy imatrix: cannot tell how many experts its merged tensors hold", file=path)
    return gates[0] // width


# ---- normalisation ----

def normalize(stat: ImatrixStat, legacy: bool = False) -> torch.Tensor:
    """llama-quantize's vector for one matrix: float32 sum / count; 1.0 everywhere if count is 0
    (legacy: values / ncall, values as they are if ncall is 0)."""
    if stat.count > 0:
        return stat.sum_sq.float() / np.float32(stat.count)
    return stat.sum_sq.float().clone() if legacy else torch.ones_like(stat.sum_sq, dtype=torch.float32)


def load_imatrix(path) -> dict[str, torch.Tensor]:
    """canonical name -> float32 vector, as llama-quantize derives it from the file (GGUF or legacy)."""
    data = read_imatrix(path)
    return {name: normalize(s, data.legacy) for name, s in data.items()}


def imatrix_for_writer(data, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The GGUF writer's `imatrix` argument from an Imatrix (or from load_imatrix's vectors): canonical name
    -> vector, checked against `spec` (a length that does not fit is an error, as in llama-quantize)."""
    legacy = getattr(data, "legacy", False)
    out = {}
    for name, v in data.items():
        parsed = names.parse(name)
        if parsed is None or (parsed[1] or 0) >= spec.n_layers or (parsed[2] or 0) >= spec.n_experts:
            continue  # llama-quantize ignores entries no tensor asks for
        vec = normalize(v, legacy) if isinstance(v, ImatrixStat) else torch.as_tensor(v, dtype=torch.float32)
        cols = names.expected_shape(name, spec)[-1]
        if vec.numel() != cols:
            raise ShapeError(f"imatrix has {vec.numel()} values for {name}, whose rows have {cols}",
                             file=getattr(data, "path", None))
        out[name] = vec
    return out
