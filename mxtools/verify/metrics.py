"""Perplexity and KL-divergence statistics, mirroring llama.cpp's tools/perplexity/perplexity.cpp.

Protocol: llama.cpp's chunks of the token stream (BOS first), each fed with BOS in its first position, the
second half scored: mxtools/core/chunking.py.

Statistics are those of llama.cpp's `kl_divergence()`: sums accumulated per token, `mean_and_uncertainty`
(standard error only when more than 10 values), the covariance of the two NLLs, linearly interpolated
percentiles. One deliberate difference: KLD is summed over the whole vocabulary in float64 from exact
(or finely quantised, see `save_base`) base log-probs, where llama.cpp drops base log-probs below -16.

Saved base file (`save_base` / `load_base`): the reference's log-probs at the scored positions plus the
chunked tokens and n_ctx, so a different text, tokenizer or context is refused with a clear error (and a base of
header version 1, whose chunks were cut one token later than llama.cpp's, is refused as such).
Encoding "u16" (default) stores, per position, log p - max log p on a uniform grid over [-32, 0] nats
(65535 steps of 4.9e-4; 0 = below the window, treated as probability 0; mass lost < 32000 * e^-32 = 4e-10)
and renormalises on load. Per-entry error <= 2.5e-4 nats; because KLD is second order around p_base the
KLD of a model against its own u16 base is ~ step^2/24 ~ 1e-8 per token, well under 1e-6. The file is
2 bytes per vocabulary entry per scored position (16 MB per 512-token chunk of Mixtral). "f32" stores exact
log-probs at twice the size.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.chunking import BOS_ID, n_scored
from ..core.errors import FormatError, MxError, ShapeError
from ..core.values import is_kind
from ..io.atomic import atomic_output

KLD_QUANTILES = [("max", 1.0), ("99.9", 0.999), ("99", 0.99), ("95", 0.95), ("90", 0.90), ("median", 0.5),
                 ("10", 0.10), ("5", 0.05), ("1", 0.01), ("0.1", 0.001), ("min", 0.0)]
DP_QUANTILES = KLD_QUANTILES[:5] + [("75", 0.75)] + KLD_QUANTILES[5:6] + [("25", 0.25)] + KLD_QUANTILES[6:]


class BaseMismatchError(MxError):
    """A saved base does not belong to this evaluation (other tokens, context size or vocabulary)."""


# ---------------------------------------------------------------- statistics

def mean_and_uncertainty(s: float, s2: float, n: int) -> tuple[float, float]:
    """llama.cpp's: mean and its standard error (0 unless more than 10 values)."""
    if n < 1:
        return 0.0, 0.0
    f = s / n
    df = s2 / n - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def covariance(sa: float, sb: float, sab: float, n: int) -> float:
    """llama.cpp's covariance of two means (0 for fewer than 10 values)."""
    if n < 10:
        return 0.0
    return (sab / n - (sa / n) * (sb / n)) / (n - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's linearly interpolated percentile of sorted values."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * sorted_values[ip] + p * sorted_values[min(ip + 1, len(sorted_values) - 1)])


def token_stats(logp: torch.Tensor, targets: torch.Tensor, base: torch.Tensor | None = None) -> dict:
    """Per-token values for log-probs [P, V] (fp32) of the candidate and optionally the base.

    nll, and with a base: nll_base, kld = sum_v p_b (log p_b - log p_q), same_top, p_diff = p_q - p_b
    (probabilities of the actual next token).
    """
    t = targets.to(logp.device).long()
    lq = _renormalise(logp)
    nll = -lq.gather(-1, t[:, None])[:, 0]
    out = {"nll": nll}
    if base is None:
        return out
    lb = _renormalise(base.to(logp.device))
    pb = lb.exp()
    # 0 * (-inf) terms (tokens outside a quantised base's window) contribute nothing
    kld = torch.where(pb > 0, pb * (lb - lq), torch.zeros((), dtype=torch.float64, device=pb.device)).sum(-1)
    nll_b = -lb.gather(-1, t[:, None])[:, 0]
    out.update(nll_base=nll_b, kld=kld, same_top=(logp.argmax(-1) == base.argmax(-1)),
               p_diff=torch.exp(-nll) - torch.exp(-nll_b))
    return out


def _renormalise(logp: torch.Tensor) -> torch.Tensor:
    """float64 log-probs normalised again: fp32 log_softmax over 32000 entries is off by ~1e-7, which would
    otherwise show up as a first-order KLD floor (even a negative KLD)."""
    lp = logp.double()
    return lp - torch.logsumexp(lp, dim=-1, keepdim=True)


class Accumulator:
    """Running sums as llama.cpp keeps them, fed one chunk at a time; `result()` gives the summary dict."""

    def __init__(self):
        self.n = 0
        self.sums = {k: 0.0 for k in ("nll", "nll2", "nll_b", "nll_b2", "nll_nll_b", "kld", "kld2",
                                      "dp", "dp2", "dp4")}
        self.same_top = 0
        self.kld_values, self.dp_values = [], []
        self.chunk_kld = []  # each chunk's mean KLD over its scored tokens (paired comparisons: verify/paired.py)
        self.with_base = None

    def add(self, logp: torch.Tensor, targets: torch.Tensor, base: torch.Tensor | None = None) -> dict:
        """Add one chunk's scored positions; returns that chunk's per-token values."""
        if self.with_base is None:
            self.with_base = base is not None
        elif self.with_base != (base is not None):
            raise ValueError("every chunk must be given a base, or none")
        v = token_stats(logp, targets, base)
        self.n += v["nll"].numel()
        s = self.sums
        s["nll"] += float(v["nll"].sum())
        s["nll2"] += float((v["nll"] ** 2).sum())
        if base is not None:
            self._add_base(v)
        return v

    def _add_base(self, v: dict) -> None:
        s = self.sums
        s["nll_b"] += float(v["nll_base"].sum())
        s["nll_b2"] += float((v["nll_base"] ** 2).sum())
        s["nll_nll_b"] += float((v["nll"] * v["nll_base"]).sum())
        s["kld"] += float(v["kld"].sum())
        s["kld2"] += float((v["kld"] ** 2).sum())
        dp2 = v["p_diff"] ** 2
        s["dp"] += float(v["p_diff"].sum())
        s["dp2"] += float(dp2.sum())
        s["dp4"] += float((dp2 ** 2).sum())
        self.same_top += int(v["same_top"].sum())
        self.kld_values.append(v["kld"].float().cpu().numpy())
        self.chunk_kld.append(float(v["kld"].double().mean()) if v["kld"].numel() else 0.0)
        self.dp_values.append(v["p_diff"].float().cpu().numpy())

    def result(self) -> dict:
        """Summary statistics; the base-dependent keys only when a base was given."""
        s, n = self.sums, self.n
        ln_ppl, ln_ppl_unc = mean_and_uncertainty(s["nll"], s["nll2"], n)
        ppl = math.exp(ln_ppl)
        out = {"n_tokens": n, "ppl": ppl, "ppl_unc": ppl * ln_ppl_unc, "ln_ppl": ln_ppl}
        if self.with_base and n:
            out.update(self._base_result(ln_ppl, ln_ppl_unc))
        return out

    def _base_result(self, ln_ppl: float, ln_ppl_unc: float) -> dict:
        s, n = self.sums, self.n
        ppl = math.exp(ln_ppl)
        lb, lb_unc = mean_and_uncertainty(s["nll_b"], s["nll_b2"], n)
        ppl_b = math.exp(lb)
        cov = covariance(s["nll"], s["nll_b"], s["nll_nll_b"], n)
        ratio_unc = math.sqrt(max(ln_ppl_unc ** 2 + lb_unc ** 2 - 2 * cov, 0.0))
        ratio = math.exp(ln_ppl - lb)
        kld, kld_unc = mean_and_uncertainty(s["kld"], s["kld2"], n)
        dp, dp_unc = mean_and_uncertainty(s["dp"], s["dp2"], n)
        mse, mse_unc = mean_and_uncertainty(s["dp2"], s["dp4"], n)
        rms = math.sqrt(mse)
        same = self.same_top / n
        kv, dv = np.sort(np.concatenate(self.kld_values)), np.sort(np.concatenate(self.dp_values))
        return {
            "ppl_base": ppl_b, "ppl_base_unc": ppl_b * lb_unc,
            "ln_ppl_cor": cov / (ln_ppl_unc * lb_unc) if ln_ppl_unc > 0 and lb_unc > 0 else None,
            "ln_ppl_ratio": ln_ppl - lb, "ln_ppl_ratio_unc": ratio_unc,
            "ppl_ratio": ratio, "ppl_ratio_unc": ratio * ratio_unc,
            "ppl_diff": ppl - ppl_b,
            "ppl_diff_unc": math.sqrt(max((ppl * ln_ppl_unc) ** 2 + (ppl_b * lb_unc) ** 2
                                          - 2 * ppl * ppl_b * cov, 0.0)),
            "kld_mean": kld, "kld_unc": kld_unc,
            "kld_percentiles": {k: percentile(kv, f) for k, f in KLD_QUANTILES},
            "dp_mean": dp, "dp_unc": dp_unc,
            "dp_percentiles": {k: percentile(dv, f) for k, f in DP_QUANTILES},
            "dp_rms": rms, "dp_rms_unc": 0.5 / rms * mse_unc if rms > 0 else 0.0,
            "same_top_p": same,
            "same_top_p_unc": math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
            "kld_histogram": _histogram(kv),
            "chunk_kld": list(self.chunk_kld),
        }


def _histogram(sorted_kld: np.ndarray, bins: int = 40) -> dict:
    """Log-spaced histogram of per-token KLD (for plots); exact zeros counted apart."""
    pos = sorted_kld[sorted_kld > 0]
    if pos.size == 0:
        return {"zeros": int(sorted_kld.size), "edges": [], "counts": []}
    lo, hi = max(float(pos[0]), 1e-12), max(float(pos[-1]), 1e-12) * (1 + 1e-9)
    edges = np.geomspace(lo, hi, bins + 1) if hi > lo else np.array([lo, hi * 1.000001])
    counts, _ = np.histogram(pos, edges)
    return {"zeros": int((sorted_kld <= 0).sum()), "edges": edges.tolist(), "counts": counts.tolist()}


def compare(logprobs, targets, base=None) -> dict:
    """Statistics over lists of per-chunk log-prob tensors [P, V], targets [P] and optional base [P, V]."""
    acc = Accumulator()
    for i, (lp, t) in enumerate(zip(logprobs, targets)):
        acc.add(lp, t, None if base is None else base[i])
    return acc.result()


# ---------------------------------------------------------------- saved base

MAGIC = b"MXBASE1\n"
# 2: chunks of llama.cpp's stream (BOS first). Version 1 bases hold chunks cut one token later (no leading BOS).
BASE_VERSION = 2
WINDOW = 32.0  # nats below the top log-prob kept by the u16 encoding
STEPS = 65535
ENCODINGS = {"u16": np.dtype("<u2"), "f32": np.dtype("<f4")}


def _encode(logp: torch.Tensor, encoding: str) -> np.ndarray:
    lp = logp.float().cpu()
    if encoding == "f32":
        return lp.numpy().astype("<f4")
    rel = lp - lp.max(dim=-1, keepdim=True).values + WINDOW  # in [.., WINDOW]
    q = torch.round(rel * (STEPS / WINDOW)).clamp(0, STEPS)
    return q.numpy().astype("<u2")


def _decode(rows: np.ndarray, encoding: str) -> torch.Tensor:
    if encoding == "f32":
        return torch.from_numpy(np.array(rows, dtype=np.float32))
    q = torch.from_numpy(rows.astype(np.float64))
    # in float64 and relative to the top entry, so the likely tokens keep full precision
    lp = torch.where(q > 0, (q - STEPS) * (WINDOW / STEPS), torch.tensor(float("-inf"), dtype=torch.float64))
    return (lp - torch.logsumexp(lp, dim=-1, keepdim=True)).float()


class BaseWriter:
    """Writes a base file chunk by chunk (the reference's log-probs never all in memory at once).

    Use as a context manager; the file appears under its name only when every chunk has been added.
    """

    def __init__(self, path, chunks: torch.Tensor, n_vocab: int, encoding: str = "u16"):
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown base encoding {encoding!r}; use one of {sorted(ENCODINGS)}")
        self.path, self.chunks, self.encoding = Path(path), chunks, encoding
        n_chunks, n_ctx = chunks.shape
        self.header = {"version": BASE_VERSION, "n_ctx": int(n_ctx), "n_chunks": int(n_chunks),
                       "n_vocab": int(n_vocab), "n_scored": n_scored(n_ctx), "encoding": encoding, "window": WINDOW,
                       "bos": BOS_ID}
        self.added = 0

    def __enter__(self):
        self._ctx = atomic_output(self.path, directory=False)
        self._fh = open(self._ctx.__enter__(), "wb")
        self._fh.write(_header_bytes(self.header))
        self._fh.write(self.chunks.numpy().astype("<i4").tobytes())
        return self

    def add(self, logp: torch.Tensor) -> None:
        """Append one chunk's scored log-probs [n_scored, n_vocab]."""
        want = (self.header["n_scored"], self.header["n_vocab"])
        if tuple(logp.shape) != want:
            raise ShapeError(f"base chunk has shape {list(logp.shape)}, expected {list(want)}")
        self._fh.write(_encode(logp, self.encoding).tobytes())
        self.added += 1

    def __exit__(self, exc_type, exc, tb):
        self._fh.close()
        if exc_type is None and self.added != self.header["n_chunks"]:
            exc = ValueError(f"base file got {self.added} of {self.header['n_chunks']} chunks")
            self._ctx.__exit__(type(exc), exc, None)
            raise exc
        return self._ctx.__exit__(exc_type, exc, tb)


def _header_bytes(header: dict) -> bytes:
    """Magic, u32 length, JSON, padded so the arrays start 64-byte aligned."""
    body = json.dumps(header).encode()
    pad = -(len(MAGIC) + 4 + len(body)) % 64
    body += b" " * pad
    return MAGIC + len(body).to_bytes(4, "little") + body


def save_base(path, chunks: torch.Tensor, logprobs, n_vocab: int, encoding: str = "u16") -> Path:
    """Save per-chunk scored log-probs (an iterable of [n_scored, V] tensors) with `chunks` [n, n_ctx]."""
    with BaseWriter(path, chunks, n_vocab, encoding) as w:
        for lp in logprobs:
            w.add(lp)
    return Path(path)


@dataclass
class SavedBase:
    """A base file opened for reading; `chunk(i)` gives fp32 log-probs [n_scored, V] of chunk i."""

    path: Path
    header: dict
    tokens: np.ndarray  # [n_chunks, n_ctx] int32, original tokens (before BOS replacement)
    data: np.ndarray  # memmap [n_chunks, n_scored, n_vocab]

    @property
    def n_ctx(self) -> int:
        return self.header["n_ctx"]

    def chunk(self, i: int) -> torch.Tensor:
        lp = _decode(self.data[i], self.header["encoding"])
        if torch.isnan(lp).any() or not torch.isfinite(lp.amax(-1)).all():
            raise FormatError(f"chunk {i} holds log-probs that are no finite distribution", file=self.path)
        return lp

    def check(self, chunks: torch.Tensor, n_vocab: int | None = None) -> None:
        """Refuse a base computed over other tokens, another context size or another vocabulary."""
        if self.header.get("version") != BASE_VERSION:
            raise BaseMismatchError(f"base was saved by an mxtools with other chunks (version "
                                    f"{str(self.header.get('version'))[:20]}, now {BASE_VERSION}); save it again",
                                    file=self.path)
        n, ctx = chunks.shape
        if ctx != self.n_ctx:
            raise BaseMismatchError(f"base was computed with ctx {self.n_ctx}, this run uses {ctx}", file=self.path)
        if n_vocab is not None and n_vocab != self.header["n_vocab"]:
            raise BaseMismatchError(f"base has a vocabulary of {self.header['n_vocab']}, the model {n_vocab}",
                                    file=self.path)
        if n > self.tokens.shape[0]:
            raise BaseMismatchError(f"base holds {self.tokens.shape[0]} chunks, this run needs {n}", file=self.path)
        diff = np.nonzero(self.tokens[:n].reshape(-1) != chunks.numpy().reshape(-1))[0]
        if diff.size:
            raise BaseMismatchError(f"tokens differ from the base's at position {int(diff[0])} "
                                    "(other text or tokenizer?)", file=self.path)


MAX_HEADER_BYTES = 1 << 16  # a header is ~200 bytes of JSON


def load_base(path) -> SavedBase:
    """Open a base file written by `save_base` (memory mapped). The header must be what BaseWriter writes and
    describe exactly the file's bytes; anything else is a FormatError naming the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(len(MAGIC)) != MAGIC:
            raise FormatError("not an mxtools base log-prob file", file=path)
        length = int.from_bytes(fh.read(4), "little")
        if length > min(MAX_HEADER_BYTES, size - fh.tell()):
            raise FormatError(f"corrupt base header (length {length})", file=path)
        header = _base_header(fh.read(length), path)
        start = fh.tell()
    n, ctx, ns, nv = header["n_chunks"], header["n_ctx"], header["n_scored"], header["n_vocab"]
    dt = ENCODINGS[header["encoding"]]
    tok_bytes = n * ctx * 4
    if size != start + tok_bytes + n * ns * nv * dt.itemsize:
        raise FormatError("base file is truncated or has extra bytes", file=path)
    tokens = np.fromfile(path, dtype="<i4", count=n * ctx, offset=start).reshape(n, ctx)
    data = np.memmap(path, dtype=dt, mode="r", offset=start + tok_bytes, shape=(n, ns, nv))
    return SavedBase(path, header, tokens, data)


def _base_header(body: bytes, path: Path) -> dict:
    """The JSON header of a base file, checked field by field."""
    try:
        header = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FormatError(f"corrupt base header ({exc})", file=path) from None
    if not is_kind(header, dict):
        raise FormatError("corrupt base header (not a JSON object)", file=path)
    for key in ("n_ctx", "n_chunks", "n_vocab", "n_scored"):
        if not is_kind(header.get(key), int) or header[key] < 1:
            raise FormatError(f"base header {key} is {str(header.get(key))[:40]}, not a count", file=path)
    if header["n_scored"] != n_scored(header["n_ctx"]):
        raise FormatError(f"base header n_scored {header['n_scored']} does not fit n_ctx {header['n_ctx']}",
                          file=path)
    if not is_kind(header.get("encoding"), str) or header["encoding"] not in ENCODINGS:
        raise FormatError(f"base header encoding {str(header.get('encoding'))[:40]} is not one of "
                          f"{sorted(ENCODINGS)}", file=path)
    return header
