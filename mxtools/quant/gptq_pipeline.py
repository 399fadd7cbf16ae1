"""GPTQ (or round-to-nearest) for a whole Mixtral, one decoder layer at a time, through the real router.

The calibration samples run through the reference forward pass (mxtools.model.forward) layer by layer. Inside a layer
the Linears are quantized in GPTQ's sequential order, each group's Hessian built from inputs that already went through
the quantized earlier groups (docs/QUALITY.md, section 4):
  [q, k, v]   from the normed attention input
  [o]         from the attention output before o_proj, computed with the quantized q/k/v
  [w1, w3]    of expert e, from the tokens the (unquantized) router sends to e; experts="all": from every token
  [w2]        of expert e, from its intermediate activations computed with its quantized w1/w3
The Linears of a bracket share one Hessian and are quantized as one problem, stacked along the rows; the experts
go in batches (as many as EXPERT_BATCH_FRACTION of an accelerator's free memory holds, all 8 on a 141 GB GPU; one
8x7B expert at a time on a CPU), every [w1, w3] of a batch in one GPTQ batch and then every [w2] in another
(quant/gptq_groups.py): on a GPU GPTQ's column loops cost kernel launches, so a batch costs about what one expert
does (bench/gptq_launches.py). The results are those of one Linear at a time.
The layer output uses the normal routing and the quantized weights: layer i+1 is calibrated on what the quantized
layer i produces. Only one layer's weights are loaded at a time; the calibration hidden states of all samples
stay between layers (on the device when they fit in a quarter of its free memory, else on the CPU). Block-output
reconstruction (`tune`, quant/gptq_tune.py) then tunes each layer's scales (int groups' or ggml blocks') towards the
float model's outputs.

The asymmetric objective (`gptaq` > 0, GPTAQ): a second stream of hidden states runs through the unquantized layers
beside the quantized one, and every Linear's Hessian also accumulates the cross-covariance of the same tokens'
unquantized inputs with its quantized-stream inputs (an expert: the tokens the quantized stream routes to it), so
each weight is quantized towards min ||X_fp W^T - X Q^T|| (gptq.gptaq_target moves the weight handed to the
quantizer, GPTQ int or a ggml grid, by that least-squares correction, damped and scaled by `gptaq`). It costs a
copy of the hidden states and of the attention output, the unquantized forward and a second Hessian accumulation.

Starved experts: a Linear whose Hessian saw fewer than `min_tokens` tokens falls back to round-to-nearest (its
experts are never zeroed). The default threshold is MIN_TOKEN_FRACTION (10%) of the model's hidden size (410
tokens for 8x7B, 0.16% of 128 x 2048 calibration tokens, in the spirit of GPTQModel's 0.5% rule): below that the
Hessian has a rank far under its width and GPTQ fits noise. A Cholesky that fails raises the damping (gptq.py);
one that fails at every damping also falls back to round-to-nearest. Everything is reported per Linear.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..core import names
from ..core.errors import MxError
from ..core.names import weight_name
from ..core.tensors import Checkpoint, LazyTensor, require_finite
from ..core.values import is_kind
from ..model import forward
from .gptq import Hessian, QuantConfig, gptaq_target
from .gptq_groups import quantize_weights
from .gptq_tune import TuneConfig, gptq_rounding, tune_layer

# The Linears GPTQ quantizes (names.Kind.gptq); the router, norms, embeddings and lm_head stay in float.
QUANTIZED_KINDS = names.GPTQ_KINDS
MIN_TOKEN_FRACTION = 0.1  # default min_tokens = this x hidden size (see the module docstring)
METHODS = ("gptq", "rtn")
EXPERT_MODES = ("routed", "all")
HIDDEN_ON_DEVICE_FRACTION = 0.25  # keep calibration activations on an accelerator when they fit in this share
# Experts quantized together in one GPTQ batch: as many as fit in this share of an accelerator's free memory; on a
# CPU only while their working set stays under EXPERT_BATCH_CPU_BYTES (for 8x7B: one expert at a time).
EXPERT_BATCH_FRACTION = 0.5
EXPERT_BATCH_CPU_BYTES = 2 ** 30

Progress = Callable[[int, int, str], None]  # (layer, n_layers, stage)


# ---------------------------------------------------------------- calibration samples

def make_samples(tokens_or_chunks, nsamples: int = 128, seqlen: int = 2048, bos_id: int = 1):
    """Calibration samples [n, seqlen] (int64) and a report dict. A flat token list (the tokenized text, without
    BOS) is cut into non-overlapping windows of seqlen - 1 tokens, each prefixed with BOS; `nsamples` windows spread
    evenly over the text (fewer when the text is short, reported as "short"). A 2-D input is taken as ready-made
    samples (the first `nsamples` rows)."""
    t = torch.as_tensor(tokens_or_chunks, dtype=torch.long)
    if t.dim() == 2:
        t = t[:nsamples]
        return t, {"samples": t.shape[0], "requested": nsamples, "seqlen": t.shape[1],
                   "calib_tokens": t.numel(), "short": t.shape[0] < nsamples}
    if t.dim() != 1 or seqlen < 2 or nsamples < 1:
        raise MxError(f"calibration needs a flat token list, nsamples >= 1 and seqlen >= 2 "
                      f"(got shape {list(t.shape)}, nsamples {nsamples}, seqlen {seqlen})")
    body, available = seqlen - 1, t.numel() // (seqlen - 1)
    if available == 0:
        raise MxError(f"calibration text has {t.numel()} tokens, fewer than one sample of --seqlen {seqlen}")
    n = min(nsamples, available)
    starts = torch.linspace(0, available - 1, n).round().long() * body
    rows = torch.stack([t[s:s + body] for s in starts.tolist()])
    samples = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), rows], dim=1)
    return samples, {"samples": n, "requested": nsamples, "seqlen": seqlen, "calib_tokens": t.numel(),
                     "short": n < nsamples}


# ---------------------------------------------------------------- one layer

@dataclass
class LayerQuant:
    """One finished layer: quantized results by canonical weight name, and its report entry."""

    index: int
    results: dict
    report: dict


@dataclass
class _Run:
    """Settings shared by every layer of one quantization run."""

    ckpt: Checkpoint
    cfg: QuantConfig
    method: str
    experts: str
    dev: torch.device
    store: torch.device  # where the hidden states of all samples live between stages
    dtype: torch.dtype
    min_tokens: int
    rope: tuple | None = None
    results: dict = field(default_factory=dict)
    # (canonical name, w, Hessian | None, method, min_tokens) -> (result with .dequantize(), entry): another per-matrix
    # quantizer (--to gguf: quant/gguf_quantize.py; its .rounding serves `tune`); None: quantize_weights with cfg
    quantizer: Callable | None = None
    gptaq: float = 0.0  # the asymmetric objective's scale (0: off; see the module docstring)
    gptaq_ridge: float = 0.05  # its least-squares damping, a fraction of mean(diag(H))
    tune: TuneConfig = field(default_factory=TuneConfig)  # block-output reconstruction after GPTQ (off: iters 0)
    tune_ref: torch.Tensor | None = None  # its targets' stream: the float model's hidden states (first positions)

    @property
    def cross(self) -> bool:
        """Whether Hessians also accumulate the unquantized stream's cross-covariance."""
        return self.gptaq > 0 and self.method == "gptq"

    def quantize(self, i: int, jobs: list) -> list[list[tuple[torch.Tensor, dict]]]:
        """Quantize groups of Linears of layer i, each group (Hessian or None, [(key, expert, w), ...]) sharing one
        Hessian; keep the results, return per Linear (dequantized weight on the device, report entry). With the
        asymmetric objective on, the quantizer gets W' (gptq.gptaq_target) instead of W."""
        jobs = [(hess, [(key, e, self._target(w, hess)) for key, e, w in mats]) for hess, mats in jobs]
        if self.quantizer is None:
            done = quantize_weights([(hess, [w for *_, w in mats]) for hess, mats in jobs], self.cfg, self.method,
                                    self.min_tokens)
        else:
            done = [[self.quantizer(weight_name(key, i, e), w, hess, self.method, self.min_tokens)
                     for key, e, w in mats] for hess, mats in jobs]
        out = []
        for (_, mats), results in zip(jobs, done):
            out.append([])
            for (key, e, _), (res, entry) in zip(mats, results):
                self.results[weight_name(key, i, e)] = res
                out[-1].append((res.dequantize().to(self.dev, self.dtype), entry))
        return out

    def _target(self, w: torch.Tensor, hess: Hessian | None) -> torch.Tensor:
        if (hess is not None and hess.n_tokens >= max(self.min_tokens, 1) and hess.cross_matrix() is not None
                and self.method == "gptq"):
            return gptaq_target(w, hess.matrix(), hess.cross_matrix(), self.gptaq, self.gptaq_ridge)
        return w


def _batches(h: torch.Tensor, dev) -> Iterator[tuple[int, torch.Tensor]]:
    """(first sample, samples on the device) in groups of forward.SEQS_PER_ATTENTION sequences."""
    for s in range(0, h.shape[0], forward.SEQS_PER_ATTENTION):
        yield s, h[s:s + forward.SEQS_PER_ATTENTION].to(dev)


def _attention_stage(run: _Run, w: forward.LayerWeights, h: torch.Tensor, i: int,
                     w_float: forward.LayerWeights | None = None, h_float: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Quantize [q, k, v] then [o]; return the hidden state after the attention residual (and the unquantized
    stream's, when h_float, the unquantized stream's layer input, and w_float, the layer's float weights, are
    given)."""
    spec, report, cross = run.ckpt.spec, {}, h_float is not None

    def normed(x, s, n):  # the unquantized stream's normed input of samples s..s+n, or None
        return forward.rms_norm(x[s:s + n].to(run.dev), w_float.attn_norm, spec.norm_eps) if cross else None

    hess = Hessian(spec.dim, run.dev, cross=cross)
    for s, hb in _batches(h, run.dev):
        hess.add(forward.rms_norm(hb, w.attn_norm, spec.norm_eps), normed(h_float, s, hb.shape[0]))
    qkv = [(key, None, getattr(w, attr)) for key, attr in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v"))]
    for attr, (new, report[attr]) in zip("qkv", run.quantize(i, [(hess, qkv)])[0]):
        setattr(w, attr, new)
    del hess, qkv
    att = torch.empty(h.shape[:2] + (spec.n_heads * spec.head_dim,), dtype=h.dtype, device=run.store)
    att_float = torch.empty_like(att) if cross else None
    hess_o = Hessian(att.shape[-1], run.dev, cross=cross)
    for s, hb in _batches(h, run.dev):
        out = forward.attention_heads(forward.rms_norm(hb, w.attn_norm, spec.norm_eps), w, spec, run.rope)
        out_float = forward.attention_heads(normed(h_float, s, hb.shape[0]), w_float, spec, run.rope) if cross else None
        hess_o.add(out, out_float)
        att[s:s + out.shape[0]] = out.to(run.store)
        if cross:
            att_float[s:s + out.shape[0]] = out_float.to(run.store)
    (w.o, report["o"]), = run.quantize(i, [(hess_o, [("attn_output", None, w.o)])])[0]
    del hess_o
    return _residual(run, h, att, w.o), _residual(run, h_float, att_float, w_float.o) if cross else None, report


def _residual(run: _Run, h: torch.Tensor, att: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """h + o_proj(att), sample group by sample group, on the store device."""
    mid = torch.empty_like(h)
    for s, hb in _batches(h, run.dev):
        mid[s:s + hb.shape[0]] = (hb + F.linear(att[s:s + hb.shape[0]].to(run.dev), o)).to(run.store)
    return mid


def _pieces(x: torch.Tensor, rows: torch.Tensor, dev) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(row indices, x[rows] on the device) in pieces of forward.TOKENS_PER_STEP rows."""
    for s in range(0, rows.numel(), forward.TOKENS_PER_STEP):
        r = rows[s:s + forward.TOKENS_PER_STEP]
        yield r, x[r.to(x.device)].to(dev)


def _experts(run: _Run, w, chunk: list[int], i: int, xn, top_w, top_i, out, w_float=None, xn_float=None) -> list[dict]:
    """Quantize the experts in `chunk` together, every [w1, w3] in one GPTQ batch then every [w2] in another, and
    add their routed outputs (quantized weights) to `out`. xn_float: the unquantized stream's normed input (w_float:
    the layer's float weights) for the cross-covariances."""
    cross = xn_float is not None
    routed = {e: forward.routed_tokens(top_i, e) for e in chunk}
    calib = {e: torch.arange(xn.shape[0], device=top_i.device) if run.experts == "all" else routed[e][0]
             for e in chunk}
    reports = {e: {"expert": e, "tokens": int(routed[e][0].numel()), "hessian_tokens": int(calib[e].numel())}
               for e in chunk}

    def unquantized(r):  # the unquantized stream's inputs of rows r, or None
        return xn_float[r.to(xn_float.device)].to(run.dev) if cross else None

    def hessian(e, width, inputs):  # expert e's Hessian of `inputs(x, x_float)` over its calibration tokens
        hess = Hessian(width, run.dev, cross=cross)
        for r, x in _pieces(xn, calib[e], run.dev):
            hess.add(*inputs(x, unquantized(r)))
        return hess

    h13 = [hessian(e, xn.shape[1], lambda x, x_float: (x, x_float)) for e in chunk]
    done = run.quantize(i, [(h, [("ffn_gate", e, w.experts[e][0]), ("ffn_up", e, w.experts[e][2])])
                            for h, e in zip(h13, chunk)])
    del h13
    quantized = {e: [w1, None, w3] for e, ((w1, reports[e]["w1"]), (w3, reports[e]["w3"])) in zip(chunk, done)}

    def mid(e, x, x_float):  # w2's inputs: quantized w1/w3 on the quantized stream, float ones on the other
        w1, _, w3 = quantized[e]
        f1, _, f3 = w_float.experts[e] if cross else (None, None, None)
        return (F.silu(F.linear(x, w1)) * F.linear(x, w3),
                F.silu(F.linear(x_float, f1)) * F.linear(x_float, f3) if cross else None)

    h2 = [hessian(e, w.experts[e][0].shape[0], lambda x, x_float, e=e: mid(e, x, x_float)) for e in chunk]
    done = run.quantize(i, [(h, [("ffn_down", e, w.experts[e][1])]) for h, e in zip(h2, chunk)])
    del h2
    for e, ((quantized[e][1], reports[e]["w2"]),) in zip(chunk, done):
        rows, slot = routed[e]
        w1, w2, w3 = quantized.pop(e)
        # The layer output, exactly as forward.moe computes it (same pieces, fp32 routing weight product).
        for s in range(0, rows.numel(), forward.TOKENS_PER_STEP):
            r, sl = rows[s:s + forward.TOKENS_PER_STEP], slot[s:s + forward.TOKENS_PER_STEP]
            y = forward.expert_forward(xn[r.to(xn.device)].to(run.dev), w1, w2, w3) * top_w[r, sl, None]
            out.index_add_(0, r.to(out.device), y.to(out.dtype).to(out.device))
        reports[e]["method"] = _summary_method(reports[e])
        w.experts[e] = None  # free the float weights of this expert
    return [reports[e] for e in chunk]


def _expert_chunks(run: _Run) -> list[list[int]]:
    """The layer's experts in the batches they are quantized in (equal sizes): as many as fit in the budget
    (EXPERT_BATCH_FRACTION of an accelerator's free memory, EXPERT_BATCH_CPU_BYTES on a CPU); one at a time for a
    per-matrix quantizer. Measured on the CPU (gptq_quantize_batch, float32): each weight of a batch holds about
    four [in, in] matrices (its Hessian's sum, H, its inverse factor, the damped H) and ten [rows, in] ones (the
    weight, its transpose, W Hd, the sweep's codes, grid values and gradient, ...); the factorizations, one at a
    time, add five [in, in] more. The widest group decides: [w2] (in = FFN width) or the stacked [w1, w3]."""
    spec = run.ckpt.spec
    n, size = spec.n_experts, 1
    if run.quantizer is None and run.method == "gptq":
        d, f = spec.dim, spec.hidden_dim
        per = 4 * max(4 * f * f + 10 * d * f, 4 * d * d + 20 * d * f)
        fixed = 4 * 5 * max(d, f) ** 2
        budget = (EXPERT_BATCH_FRACTION * torch.cuda.mem_get_info(run.dev)[0] if run.dev.type == "cuda"
                  else EXPERT_BATCH_CPU_BYTES)
        size = max(1, min(n, int((budget - fixed) // per)))
    size = math.ceil(n / math.ceil(n / size))
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def _summary_method(report: dict) -> str:
    used = {report[m]["method"] for m in ("w1", "w2", "w3")}
    return used.pop() if len(used) == 1 else "mixed"


def _moe_stage(run: _Run, w: forward.LayerWeights, mid: torch.Tensor, i: int,
               w_float: forward.LayerWeights | None = None, mid_float: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, list]:
    """Quantize every expert of the layer; return the layer output hidden state (and the unquantized stream's,
    when mid_float and w_float are given) and the experts' reports."""
    spec = run.ckpt.spec

    def normed(m):
        return torch.cat([forward.rms_norm(hb, w.ffn_norm, spec.norm_eps).reshape(-1, spec.dim).to(run.store)
                          for _, hb in _batches(m, run.dev)])

    xn = normed(mid)
    xn_float = normed(mid_float) if mid_float is not None else None
    top_w, top_i = _route(run, xn, w.router)
    out = torch.zeros_like(xn)
    reports = [r for chunk in _expert_chunks(run)
               for r in _experts(run, w, chunk, i, xn, top_w, top_i, out, w_float, xn_float)]
    nxt_float = None
    if mid_float is not None:  # the unquantized layer's output, as the reference forward computes it
        nxt_float = torch.empty_like(mid_float)
        for s, hb in _batches(mid_float, run.dev):
            nxt_float[s:s + hb.shape[0]] = (hb + forward.moe_block(hb, w_float, spec)[0]).to(run.store)
    return mid + out.view_as(mid), nxt_float, reports


def _route(run: _Run, xn: torch.Tensor, router: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k weights, expert ids) of every token of xn, in pieces of forward.TOKENS_PER_STEP."""
    routing = [forward.route(xn[s:s + forward.TOKENS_PER_STEP].to(run.dev), router, run.ckpt.spec.n_experts_per_tok)
               for s in range(0, xn.shape[0], forward.TOKENS_PER_STEP)]
    return torch.cat([r[0] for r in routing]), torch.cat([r[1] for r in routing])


def _rtn_layer(run: _Run, i: int) -> dict:
    """Round-to-nearest for every quantized Linear of layer i, loading one weight at a time (no forward pass)."""
    spec, report = run.ckpt.spec, {"attention": {}, "experts": []}
    for key, attr in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v"), ("attn_output", "o")):
        w = forward.load_weight(run.ckpt, weight_name(key, i), run.dev, run.dtype)
        report["attention"][attr] = run.quantize(i, [(None, [(key, None, w)])])[0][0][1]
    for e in range(spec.n_experts):
        entry = {"expert": e, "tokens": None, "hessian_tokens": 0}
        for key, short in (("ffn_gate", "w1"), ("ffn_up", "w3"), ("ffn_down", "w2")):
            w = forward.load_weight(run.ckpt, weight_name(key, i, e), run.dev, run.dtype)
            entry[short] = run.quantize(i, [(None, [(key, e, w)])])[0][0][1]
        entry["method"] = "rtn"
        report["experts"].append(entry)
    return report


def _gptq_layer(run: _Run, i: int, h: torch.Tensor, h_float: torch.Tensor | None = None):
    """Quantize layer i on the calibration hidden states h (and h_float, the unquantized stream's, for the asymmetric
    objective); return its report and the next layer's inputs (quantized stream, unquantized stream or None)."""
    w, spec = forward.load_layer(run.ckpt, i, run.dev, run.dtype), run.ckpt.spec
    tune = run.tune.on
    w_float = replace(w, experts=list(w.experts)) if h_float is not None or tune else None  # the float weights, kept
    mid, mid_float, attn_report = _attention_stage(run, w, h, i, w_float, h_float)
    h_in, h, h_float = (h if tune else None), None, None  # the references dropped
    nxt, nxt_float, experts = _moe_stage(run, w, mid, i, w_float, mid_float)
    report = {"attention": attn_report, "experts": experts}
    if tune:  # the next layer's inputs from the tuned weights when they are kept
        rounding = gptq_rounding if run.quantizer is None else run.quantizer.rounding
        kept, report["tune"], tuned, run.tune_ref = tune_layer(w_float, run.results, i, h_in, run.tune_ref, spec,
                                                               run.rope, run.tune, run.dev, run.store, rounding)
        run.results.update(kept)
        nxt = nxt if tuned is None else tuned
    return report, nxt, nxt_float


# ---------------------------------------------------------------- the whole model

class QuantStream:
    """Iterate to quantize the model layer by layer: yields one LayerQuant per layer, in order.

    `report` (JSON-able) is filled as layers finish; its "totals" are set after the last layer. It holds only what
    the inputs determine, so the written report is reproducible; wall-clock times go to `timings`.
    """

    def __init__(self, ckpt: Checkpoint, samples: torch.Tensor | None, sample_info: dict, run: _Run,
                 progress: Progress | None):
        self.ckpt, self.samples, self.run, self.progress = ckpt, samples, run, progress or (lambda *a: None)
        self.hidden = self.hidden_float = None
        # The token embedding table the quantized stream starts from (a quantizer that quantizes it sets its
        # dequantized table here before the first layer); None: the checkpoint's. The unquantized stream of the
        # asymmetric objective and tune's targets always start from the checkpoint's.
        self.embedding: torch.Tensor | None = None
        self.timings, cfg = {"layers_s": []}, run.cfg
        self.report = {
            "method": run.method, "experts": run.experts, "bits": cfg.bits, "group_size": cfg.group_size,
            "sym": cfg.sym, "act_order": cfg.act_order, "damp": cfg.damp, "static_groups": cfg.static_groups,
            "act_group_aware": cfg.act_group_aware, "search": cfg.search, "refit": cfg.refit, "repass": cfg.repass,
            "sweeps": cfg.sweeps, "gptaq": run.gptaq, "gptaq_ridge": run.gptaq_ridge, "min_tokens": run.min_tokens,
            "tune_iters": run.tune.iters, "tune_scales": run.tune.scales, "tune_codes": run.tune.codes,
            "device": str(run.dev), "calibration": sample_info, "layers": [],
        }

    def __iter__(self) -> Iterator[LayerQuant]:
        t0, n_layers = time.perf_counter(), self.ckpt.spec.n_layers
        h = self._embed(self.embedding) if self.run.method == "gptq" else None
        h_float = self._embed(None) if h is not None and self.run.cross else None  # the unquantized stream
        if h is not None and self.run.tune.on and self.embedding is not None:
            self.run.tune_ref = (self._embed(None) if h_float is None else h_float)[:, :self.run.tune.window].clone()
        for i in range(n_layers):
            t = time.perf_counter()
            self.run.results = {}
            if h is None:
                layer = _rtn_layer(self.run, i)
            else:
                layer, h, h_float = _gptq_layer(self.run, i, h, h_float)
            self.hidden = h  # the next layer's calibration input (None for RTN); tests and debugging read it
            self.hidden_float = h_float  # the unquantized stream's (asymmetric objective only)
            layer = {"layer": i, **layer}
            self.report["layers"].append(layer)
            self.timings["layers_s"].append(round(time.perf_counter() - t, 3))
            self.progress(i + 1, n_layers, "layer done")
            yield LayerQuant(i, self.run.results, layer)
        self.report["totals"] = totals(self.report["layers"])
        self.timings["time_s"] = round(time.perf_counter() - t0, 3)

    def _embed(self, table: torch.Tensor | None) -> torch.Tensor:
        """The calibration samples' embeddings from `table` (None: the checkpoint's)."""
        run, spec = self.run, self.ckpt.spec
        toks = forward.as_tokens(self.samples, spec, "cpu")
        run.rope = forward.rope_tables(spec, toks.shape[1], run.dev, run.dtype)
        if table is None:
            table = forward.load_weight(self.ckpt, weight_name("token_embd"), run.store, run.dtype)
        return F.embedding(toks.to(run.store), table.to(run.store, run.dtype))


def totals(layers: list[dict]) -> dict:
    """Counts over all layers: Linears per method, fallbacks and raised dampings, tokens per expert."""
    entries = [(f"layer {lay['layer']} {k}", v) for lay in layers for k, v in lay["attention"].items()]
    entries += [(f"layer {lay['layer']} expert {x['expert']} {m}", x[m]) for lay in layers
                for x in lay["experts"] for m in ("w1", "w2", "w3")]
    tokens = [x["tokens"] for lay in layers for x in lay["experts"] if x["tokens"] is not None]
    return {
        "linears": len(entries),
        "gptq": sum(e["method"] == "gptq" for _, e in entries),
        "rtn": sum(e["method"] == "rtn" for _, e in entries),
        "fallbacks": [f"{where}: {e['fallback']}" for where, e in entries if "fallback" in e],
        "damp_raised": [f"{where}: damp {e['damp']:g}" for where, e in entries if e.get("damp_raised")],
        "experts_rtn": [f"layer {lay['layer']} expert {x['expert']} ({x['hessian_tokens']} tokens)"
                        for lay in layers for x in lay["experts"]
                        if x["method"] != "gptq" and any("fallback" in x[m] for m in ("w1", "w2", "w3"))],
        "expert_tokens_min": min(tokens) if tokens else None,
        "expert_tokens_max": max(tokens) if tokens else None,
    }


def _store_device(dev: torch.device, nbytes: int, copies: int = 4) -> torch.device:
    """Keep the calibration activations (`copies` copies of nbytes) on the accelerator only when they fit."""
    if dev.type != "cuda":
        return dev
    free, _ = torch.cuda.mem_get_info(dev)
    return dev if copies * nbytes < HIDDEN_ON_DEVICE_FRACTION * free else torch.device("cpu")


def quantize_checkpoint(ckpt: Checkpoint, tokens_or_chunks, cfg: QuantConfig, method: str = "gptq",
                        experts: str = "routed", nsamples: int = 128, seqlen: int = 2048, device="auto",
                        min_tokens: int | None = None, progress: Progress | None = None,
                        dtype: torch.dtype = torch.float32, quantizer: Callable | None = None,
                        gptaq: float = 0.0, gptaq_ridge: float = 0.05, tune: TuneConfig | None = None) -> QuantStream:
    """A QuantStream that quantizes `ckpt` layer by layer (see the module docstring).

    tokens_or_chunks: the tokenized calibration text (flat, no BOS) or ready samples [n, T]; unused for "rtn".
    min_tokens: Hessian tokens below which a Linear falls back to RTN (default MIN_TOKEN_FRACTION x hidden size).
    quantizer: another per-matrix quantizer (see _Run.quantizer); cfg's packing limits then do not apply.
    gptaq, gptaq_ridge: the asymmetric objective's scale (0: off, 1: the whole least-squares correction) and damping
    (gptq.gptaq_target), for either quantizer.
    tune: block-output reconstruction of each layer after GPTQ (gptq_tune.TuneConfig; None or iters 0: off).
    """
    if not (is_kind(gptaq, float) and 0 <= gptaq <= 1 and is_kind(gptaq_ridge, float)
            and 0 <= gptaq_ridge < 1):
        raise MxError(f"the asymmetric objective's share (--gptaq, recipe key gptaq) {gptaq!r} must be in [0, 1] "
                      f"and gptaq_ridge {gptaq_ridge!r} in [0, 1)")
    if method not in METHODS:
        raise MxError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if experts not in EXPERT_MODES:
        raise MxError(f"unknown experts mode {experts!r}; choose from {', '.join(EXPERT_MODES)}")
    if quantizer is None:
        _check_dims(ckpt, cfg)
    _refuse_non_finite(ckpt)
    samples, info = (make_samples(tokens_or_chunks, nsamples, seqlen, _bos(ckpt)) if method == "gptq"
                     else (None, {"samples": 0}))
    dev = forward.resolve_device(device)
    spec = ckpt.spec
    nbytes = samples.numel() * spec.dim * dtype.itemsize if samples is not None else 0
    min_tokens = math.ceil(MIN_TOKEN_FRACTION * spec.dim) if min_tokens is None else int(min_tokens)
    copies = 6 if gptaq else 4  # the unquantized stream's hidden states and attention output
    run = _Run(ckpt, cfg, method, experts, dev, _store_device(dev, nbytes, copies), dtype, min_tokens,
               quantizer=quantizer, gptaq=float(gptaq), gptaq_ridge=float(gptaq_ridge), tune=tune or TuneConfig())
    return QuantStream(ckpt, samples, info, run, progress)


def _refuse_non_finite(ckpt: Checkpoint) -> None:
    """Make every load of ckpt's tensors (calibration forward, quantization, the writer's float tensors) refuse
    NaN and inf, naming the tensor: a quantized output cannot represent them. Costs one scan per load."""
    def checked(lazy: LazyTensor) -> LazyTensor:
        return lazy.map(lambda w: (require_finite(w, lazy, "a GPTQ/RTN quantized output"), w)[1])
    ckpt.tensors.update({name: checked(t) for name, t in ckpt.tensors.items()})


def _bos(ckpt: Checkpoint) -> int:
    return getattr(ckpt.tokenizer, "bos_id", 1) if ckpt.tokenizer is not None else 1


def _check_dims(ckpt: Checkpoint, cfg: QuantConfig) -> None:
    """Refuse up front a group size or width that the packing cannot hold (not after hours of work)."""
    spec, per_word = ckpt.spec, 32 // cfg.bits
    for key in QUANTIZED_KINDS:
        out_f, in_f = names.KIND_BY_KEY[key].shape(spec)
        try:
            cfg.group_len(in_f)
        except ValueError as exc:
            raise MxError(f"{exc} (tensor kind {key})", file=ckpt.path) from None
        if in_f % per_word or out_f % per_word:
            raise MxError(f"{key} is [{out_f}, {in_f}]: both sides must be multiples of {per_word} "
                          f"to pack {cfg.bits}-bit codes", file=ckpt.path)
