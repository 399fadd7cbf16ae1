"""`mxtools quantize SRC --to gguf --outtype MIX`: GPTQ on llama.cpp's block grids, written as an ordinary GGUF.

The GPTQ pipeline (gptq_pipeline.py: layer by layer through the reference model, per-expert Hessians from the
routed tokens, layer i+1 calibrated on the quantized layer i, starved experts rounded to nearest) runs with a
per-matrix quantizer that puts each Linear on the grid of the type llama.cpp's mix gives it (gguf_gptq.py). The
GGUF writer takes those bytes layer by layer as it reaches them; the token embedding (before the first layer) and
the output matrix (after the last) get GPTQ on their grids here; norms and router get the mix's types as `convert`
writes them. So names, types and shapes are those of llama-quantize's mix; with --method rtn the file equals
`convert --outtype MIX [--imatrix]` byte for byte.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from ..core import names
from ..core.errors import MxError
from ..core.transforms import hf_to_meta_rope, rope_heads
from ..io.ggml_blocks import SUPPORTED
from ..io.gguf_tables import FLOAT_TYPES
from ..model import forward
from . import gguf_tune
from .gguf_gptq import EMBED_DAMP, GGUFQuant, embedding_hessian, quantize_matrix
from .gguf_iq import IQ_OPTIONS, IQ_TYPES
from .gptq import GPTQError, Hessian
from .gptq_pipeline import QUANTIZED_KINDS

META_PREFIX = "mxtools.quantize."  # our own keys beside llama.cpp's general.* / llama.* / quantize.imatrix.*


class MatrixQuantizer:
    """The pipeline's per-matrix hook: each Linear on the grid of the type `policy` gives it.

    GPTQ with the Hessian when it saw at least min_tokens tokens, else (and for --method rtn) llama.cpp's own
    rounding; ggml's searches are weighted by the importance matrix when one is given, else by the Hessian
    diagonal. Types the mix keeps in float (a row length no block divides) are stored as llama.cpp would.
    An i-quant rounded to nearest without an importance matrix (an expert with too few tokens) is weighted by the
    Hessian diagonal it has, or uniformly without any token. iq_options: GGML type -> quantize_matrix keywords
    for the i-quants, over gguf_iq.IQ_OPTIONS."""

    def __init__(self, spec, policy, imatrix: dict | None, damp: float, iq_options: dict | None = None):
        self.spec, self.policy, self.imatrix, self.damp = spec, policy, imatrix or {}, damp
        self.iq_options = {**IQ_OPTIONS, **(iq_options or {})}

    def qtype(self, name: str) -> Q:
        kind, layer, _ = names.parse(name)
        return self.policy(kind.key, layer, tuple(names.expected_shape(name, self.spec)))

    def __call__(self, name: str, w: torch.Tensor, hess, method: str, min_tokens: int, damp: float | None = None):
        qtype, n = self.qtype(name), (hess.n_tokens if hess is not None else 0)
        damp = self.damp if damp is None else damp
        imat = self.imatrix.get(name)
        if qtype not in SUPPORTED:
            return _float_result(w, qtype), {"method": "copy", "type": qtype.name, "tokens": n}
        entry, h = {"type": qtype.name, "tokens": n}, None
        if method == "gptq" and n < max(min_tokens, 1):
            entry["fallback"] = f"{n} calibration tokens < min_tokens {min_tokens}"
        elif method == "gptq":
            h = hess.matrix()
        opts, res = self.iq_options.get(qtype, {}), None
        if h is not None:
            try:
                res = quantize_matrix(w, qtype, h, imat, damp, **opts)
            except GPTQError as exc:  # Cholesky failed at every damping: round this one to nearest
                entry["fallback"] = f"gptq failed: {exc}"
        if res is None:
            if method == "gptq":
                imat = _rtn_importance(qtype, imat, hess, w.shape[1], damp)
            res = quantize_matrix(w, qtype, None, imat, **opts)
        entry.update(method=res.method, loss=res.loss, damp=res.damp)
        if res.damp is not None and res.damp > damp:
            entry["damp_raised"] = True
        return _Taken(res), entry

    @staticmethod
    def rounding(w: torch.Tensor, result: _Taken, dev, cfg):
        """Block-output reconstruction's handle on one result (gptq_tune.tune_layer): its block scales."""
        return gguf_tune.rounding(result.res, dev, _Taken)


def _rtn_importance(qtype: Q, imat, hess, cols: int, damp: float):
    """The importance for rounding an i-quant to nearest without an importance matrix: the damped Hessian
    diagonal, or uniform for a matrix that saw no token (ggml's IQ1_S/IQ2_XXS/IQ2_XS searches need one)."""
    if imat is not None or qtype not in IQ_TYPES:
        return imat
    if hess is not None and hess.n_tokens > 0:
        diag = torch.diagonal(hess.matrix()).float()
        return diag + damp * diag.mean() + (diag.mean() == 0).float()
    return torch.ones(cols)


class _Taken:
    """A GGUFQuant whose dequantized weight is handed to the pipeline once and then dropped (the bytes stay)."""

    def __init__(self, res: GGUFQuant):
        self.res = res

    def dequantize(self) -> torch.Tensor:
        w, self.res.weight = self.res.weight, None
        if w is None:
            raise MxError("internal: a GGUF-quantized weight was asked for twice")
        return w


def _float_result(w: torch.Tensor, qtype: Q) -> GGUFQuant:
    stored = w.detach().to("cpu", FLOAT_TYPES[qtype]).contiguous()
    return GGUFQuant(qtype, stored.view(torch.uint8).numpy(), stored.float(), None, None, "copy")


class LayerBytes:
    """The GGUF writer's `encoded` hook: pulls layers from the QuantStream as the writer reaches them and gives
    each quantized Linear's bytes in GGUF row order (q/k rotary-permuted). The token embedding, which the writer
    reaches first, gets GPTQ along its rows with `embedding_hessian` (damping EMBED_DAMP), and the quantized
    stream then starts from its dequantized table; the output matrix, which the writer reaches after the last
    layer, gets GPTQ too, its Hessian from the final normed hidden states of the quantized model; None for every
    other tensor (norms, router: encoded as `convert` does)."""

    def __init__(self, stream, hook: MatrixQuantizer, embedding: bool = True):
        self.stream, self.hook, self.spec, self.embedding = stream, hook, hook.spec, embedding
        self.layers, self.current = iter(stream), None

    def __call__(self, t, qtype: Q):
        kind, layer, _ = names.parse(t.name)
        if kind.key == "output":
            return self._output(t.name, qtype)
        if kind.key == "token_embd":
            return self._token_embd(t.name, qtype)
        if kind.key not in QUANTIZED_KINDS:
            return None
        while self.current is None or self.current.index < layer:
            self.current = next(self.layers)
        res = self.current.results.pop(t.name).res
        if self.current.index != layer or res.qtype != qtype:
            raise MxError(f"internal: {t.name} came out as {res.qtype.name} in layer {self.current.index}, "
                          f"the writer wants {qtype.name} in layer {layer}")
        heads = rope_heads(kind.key, self.spec)
        return res.data if not heads else hf_to_meta_rope(torch.from_numpy(res.data), heads).numpy()

    def _token_embd(self, name: str, qtype: Q):
        """GPTQ of the token embedding table before the first layer; None without calibration (RTN) or for a type
        the mix keeps in float."""
        run, samples = self.stream.run, self.stream.samples
        if (not self.embedding or run.method != "gptq" or samples is None or qtype not in SUPPORTED
                or self.current is not None):
            return None
        w = forward.load_weight(run.ckpt, name, run.dev, torch.float32)
        hess = embedding_hessian(run.ckpt, samples, w)
        res, entry = self.hook(name, w, hess, run.method, run.min_tokens, damp=EMBED_DAMP)
        self.stream.report["token_embd"] = entry
        if res.res.qtype != qtype:
            raise MxError(f"internal: {name} came out as {res.res.qtype.name}, the writer wants {qtype.name}")
        self.stream.embedding = res.dequantize()  # the layers are calibrated on what the quantized table gives
        return res.res.data

    def _output(self, name: str, qtype: Q):
        """GPTQ of the output matrix on rms_norm(final hidden state); None without calibration (RTN) or when the
        layers are not all done."""
        run, h = self.stream.run, self.stream.hidden
        if h is None or self.current is None or self.current.index != self.spec.n_layers - 1:
            return None
        norm = forward.load_weight(run.ckpt, names.weight_name("output_norm"), run.dev, run.dtype)
        hess = Hessian(self.spec.dim, run.dev)
        for s in range(0, h.shape[0], forward.SEQS_PER_ATTENTION):
            hess.add(forward.rms_norm(h[s:s + forward.SEQS_PER_ATTENTION].to(run.dev), norm, self.spec.norm_eps))
        w = forward.load_weight(run.ckpt, name, run.dev, run.dtype)
        res, entry = self.hook(name, w, hess, run.method, run.min_tokens)
        self.stream.report["output"] = entry
        if res.res.qtype != qtype:
            raise MxError(f"internal: {name} came out as {res.res.qtype.name}, the writer wants {qtype.name}")
        return res.res.data

    def finish(self) -> None:
        """Run the stream to its end (it fills the report's totals after the last layer)."""
        for _ in self.layers:
            raise MxError("internal: the writer finished before the quantizer")


def metadata(method: str, calib: Path | None, info: dict, damp: float, experts: str, gptaq: float = 0.0,
             tune_iters: int = 0) -> list:
    """Our keys: what was done, on which calibration text (name and SHA-256), how much of it; `gptaq` (the
    asymmetric objective's share) and `tune_iters` (block-output reconstruction's steps per layer) only when
    they were used."""
    rows = [("method", V.STRING, method), ("experts", V.STRING, experts), ("damp", V.FLOAT32, float(damp))]
    if method == "gptq" and gptaq:
        rows.append(("gptaq", V.FLOAT32, float(gptaq)))
    if method == "gptq" and tune_iters:
        rows.append(("tune_iters", V.UINT32, int(tune_iters)))
    if method == "gptq" and calib is not None:
        rows += [("calibration.name", V.STRING, Path(calib).name),
                 ("calibration.sha256", V.STRING, hashlib.sha256(Path(calib).read_bytes()).hexdigest()),
                 ("samples", V.UINT32, int(info.get("samples", 0))), ("seqlen", V.UINT32, int(info.get("seqlen", 0)))]
    return [(META_PREFIX + k, vt, v) for k, vt, v in rows]
