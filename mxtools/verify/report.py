"""The verification report: a plain JSON-able dict, its pass/fail thresholds, a text table and a plot.

Default thresholds per outtype. Sources (docs/QUALITY.md, section 3): Mixtral-8x7B wikitext-2 PPLs (fp16 4.4091,
Q8_0 4.4088, Q6_K 4.424, Q5_K_M 4.4396, Q4_K_M 4.5111, Q4_0 4.5087, i.e. ratios 1.000 / 1.003 / 1.007 / 1.023 / 1.023)
and llama.cpp's LLaMA-3-8B mean KLDs (q8_0 0.0014, q6_K 0.0055, q5_K_M 0.0108); each limit is roughly twice the
published value so a healthy artifact passes with margin while a broken one (KLD ~1 and up) fails by orders of
magnitude. The layer limits (`max_layer_error` on the local sublayer error, `max_routing` on the local top-k
set disagreement, see lockstep.py) sit above the weight rounding error of the type and far below the ~1 of a
real fault. Float rows assume the reference is the source the candidate was converted from.

| outtype    | max ppl_ratio | max kld_mean | min same_top_p | max_layer_error | max_routing |
|------------|---------------|--------------|----------------|-----------------|-------------|
| f32        | 1.0001        | 1e-5         | 0.999          | 1e-3            | 0.001       |
| f16        | 1.001         | 1e-4         | 0.99           | 0.01            | 0.01        |
| bf16       | 1.002         | 5e-4         | 0.98           | 0.03            | 0.02        |
| q8_0       | 1.005         | 0.003        | 0.97           | 0.05            | 0.03        |
| q6_k       | 1.01          | 0.011        | 0.95           | 0.12            | 0.05        |
| q5_k_m     | 1.015         | 0.022        | 0.93           | 0.2             | 0.08        |
| q4_k_m     | 1.05          | 0.06         | 0.90           | 0.4             | 0.12        |
| q4_0       | 1.05          | 0.07         | 0.88           | 0.4             | 0.12        |
| q3_k_m     | 1.15          | 0.2          | 0.80           | 0.6             | 0.18        |
| q2_k       | 1.5           | 0.6          | 0.65           | 0.9             | 0.3         |
| gptq-int4  | 1.05          | 0.07         | 0.88           | 0.4             | 0.12        |
| gptq-int8  | 1.005         | 0.003        | 0.97           | 0.05            | 0.03        |
Unknown outtypes get the q4_0 row. Aliases: q5_k_s / q5_0 / q5_1 -> q5_k_m, q4_k_s -> q4_k_m, q4_1 -> q4_0,
q3_k_l -> q3_k_m, q3_k_s -> q2_k, gptq -> gptq-int4 (and fp32 / float32, fp16 / float16, bfloat16 for the floats).
Outtypes without a row keep their label and borrow a row (BORROWED_ROWS): the i-quant mixes the q4_k_m (iq4_*),
q3_k_m (iq3_*, iq2_m) or q2_k (iq2_s and below) row; other tools' formats the row of their code width (w4a16 ->
gptq-int4, w8a16 -> gptq-int8, bnb-int8 -> q8_0, bnb-nf4 / bnb-fp4 -> q4_0, fp8 -> q5_k_m). The q3_k_m and q2_k
rows scale the q4_k_m row by the mean-KLD ratios measured on the bundled model (plain q3_k_m 3.4x, q2_k
15x q4_k_m's; docs/BENCHMARKS.md), kept well below the ~1 of a broken artifact.

Thresholds and noise. ppl_ratio, kld_mean and same_top_p are means over the scored tokens, and the report
carries each one's standard error (`ppl_ratio_unc`, `kld_unc`, `same_top_p_unc` in `stats`, llama.cpp's
formulas). A verdict fails only when the statistic lies beyond its limit by more than NOISE_SIGMAS (2) of its
own standard error: `ppl_ratio > max_ppl_ratio + 2 * ppl_ratio_unc`, likewise kld_mean, and
`same_top_p < min_same_top_p - 2 * same_top_p_unc`. So an artifact whose true value sits inside the limit
passes whatever token a CPU's rounding flips (one flip in 252 scored tokens moves same_top_p by 0.4%, its
standard error there is 1.1%), while a real fault, orders of magnitude beyond, still fails; an artifact
exactly at a limit fails about 2% of the time. The margin shrinks as 1/sqrt(tokens): a CI gate that must
resolve finer differences scores more text (`--chunks`). The layer limits and embed_error are not means over
tokens and are compared as they are.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..core.tensors import Checkpoint
from ..core.values import is_kind
from ..io.gguf_tables import OUTTYPE_FILE_TYPE
from ..quant.mixes import MIXES, load_mix

_COLS = ("max_ppl_ratio", "max_kld_mean", "min_same_top_p", "max_layer_error", "max_routing")
_ROWS = {
    "f32": (1.0001, 1e-5, 0.999, 1e-3, 0.001),
    "f16": (1.001, 1e-4, 0.99, 0.01, 0.01),
    "bf16": (1.002, 5e-4, 0.98, 0.03, 0.02),
    "q8_0": (1.005, 0.003, 0.97, 0.05, 0.03),
    "q6_k": (1.01, 0.011, 0.95, 0.12, 0.05),
    "q5_k_m": (1.015, 0.022, 0.93, 0.2, 0.08),
    "q4_k_m": (1.05, 0.06, 0.90, 0.4, 0.12),
    "q4_0": (1.05, 0.07, 0.88, 0.4, 0.12),
    "q3_k_m": (1.15, 0.2, 0.80, 0.6, 0.18),
    "q2_k": (1.5, 0.6, 0.65, 0.9, 0.3),
    "gptq-int4": (1.05, 0.07, 0.88, 0.4, 0.12),
    "gptq-int8": (1.005, 0.003, 0.97, 0.05, 0.03),  # as q8_0: 8-bit codes, per-group scales
}
DEFAULT_THRESHOLDS = {k: dict(zip(_COLS, v)) for k, v in _ROWS.items()}
ALIASES = {"q5_k_s": "q5_k_m", "q4_k_s": "q4_k_m", "q4_1": "q4_0", "q5_0": "q5_k_m", "q5_1": "q5_k_m",
           "q3_k_l": "q3_k_m", "q3_k_s": "q2_k",
           "fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "bfloat16": "bf16", "gptq": "gptq-int4"}
# outtypes without a row of their own, held to the row of their error class (the label stays theirs)
BORROWED_ROWS = {
    # llama.cpp's i-quant mixes: the K-quant row of the nearest or a larger error class
    "iq4_xs": "q4_k_m", "iq4_nl": "q4_k_m", "iq3_m": "q3_k_m", "iq3_s": "q3_k_m", "iq3_xs": "q3_k_m",
    "iq3_xxs": "q3_k_m", "iq2_m": "q3_k_m", "iq2_s": "q2_k", "iq2_xs": "q2_k", "iq2_xxs": "q2_k",
    "iq1_m": "q2_k", "iq1_s": "q2_k",
    # other tools' formats: the row of the same code width (FP8's 3 mantissa bits: the q5_k_m row)
    "w4a16": "gptq-int4", "w8a16": "gptq-int8", "fp8": "q5_k_m", "bnb-nf4": "q4_0", "bnb-fp4": "q4_0",
    "bnb-int8": "q8_0",
}
UNKNOWN_OUTTYPE_ROW = "q4_0"  # the thresholds an outtype without a row (or alias) is held to


def gguf_file_types() -> dict[int, str]:
    """general.file_type -> outtype name, derived from the GGUF writer's float table and the mix recipes."""
    return {**{int(v): k for k, v in OUTTYPE_FILE_TYPE.items()}, **{load_mix(m).file_type: m for m in MIXES}}


def normalise_outtype(name: str) -> str:
    key = str(name).lower().replace("torch.", "")
    return ALIASES.get(key, key)


def guess_outtype(ckpt: Checkpoint) -> str:
    """The candidate's outtype: ckpt.info["outtype"], a GPTQ marker, GGUF file_type, the experts' stored type,
    else their dtype."""
    info = ckpt.info or {}
    if info.get("outtype"):
        return normalise_outtype(info["outtype"])
    gptq = info.get("gptq") if is_kind(info.get("gptq"), dict) else None
    if info.get("quant_method") == "gptq" or gptq is not None:
        return f"gptq-int{(gptq or info).get('bits', 4)}"
    file_types = gguf_file_types()
    if info.get("file_type") in file_types:
        return normalise_outtype(file_types[info["file_type"]])
    w1 = ckpt.tensors.get("model.layers.0.block_sparse_moe.experts.0.w1.weight")
    if w1 is not None and w1.stored_as:
        return normalise_outtype(w1.stored_as)
    return normalise_outtype(str(w1.dtype) if w1 is not None else "f32")


def thresholds_for(outtype: str, overrides: dict | None = None) -> dict:
    """The default row for `outtype` (UNKNOWN_OUTTYPE_ROW's if it has none) with `overrides` applied."""
    key = normalise_outtype(outtype)
    key = BORROWED_ROWS.get(key, key)
    row = dict(DEFAULT_THRESHOLDS.get(key, DEFAULT_THRESHOLDS[UNKNOWN_OUTTYPE_ROW]))
    unknown = set(overrides or {}) - set(_COLS)
    if unknown:
        raise ValueError(f"unknown threshold(s) {sorted(unknown)}; known: {', '.join(_COLS)}")
    row.update(overrides or {})
    return row


NOISE_SIGMAS = 2.0  # how many of its own standard errors a statistic must be beyond its limit to fail
# (statistic, its threshold, its standard error in report["stats"], +1 for an upper limit / -1 for a lower one)
_TOKEN_MEANS = (("ppl_ratio", "max_ppl_ratio", "ppl_ratio_unc", 1), ("kld_mean", "max_kld_mean", "kld_unc", 1),
                ("same_top_p", "min_same_top_p", "same_top_p_unc", -1))


def check(report: dict, thresholds: dict) -> list[str]:
    """Names of the thresholds the report fails (the noise rule: module docstring). Metrics absent from the
    report (no base) are not checked."""
    fails = []
    t = thresholds
    stats = report.get("stats") or {}
    for key, limit, unc, sign in _TOKEN_MEANS:
        if report.get(key) is None:
            continue
        value, noise = report[key], stats.get(unc) or 0.0
        if not math.isfinite(value) or sign * (value - t[limit]) > NOISE_SIGMAS * (noise if math.isfinite(noise)
                                                                                    else 0.0):
            fails.append(limit)
    if report.get("embed_error") is not None and report["embed_error"] > t["max_layer_error"]:
        fails.append("embed_error")
    if report.get("first_divergent_layer") is not None:
        fails.append("first_divergent_layer")
    if not (report.get("ppl") or 0) < float("inf"):
        fails.append("ppl_finite")
    return fails


def build(stats: dict, layers: list[dict], thresholds: dict, outtype: str, first_divergent=(None, None),
          embed_error=None, meta: dict | None = None) -> dict:
    """Assemble the report dict from metrics.Accumulator.result(), lockstep layers and the thresholds."""
    report = {
        "ppl": stats.get("ppl"), "ppl_base": stats.get("ppl_base"), "ppl_ratio": stats.get("ppl_ratio"),
        "kld_mean": stats.get("kld_mean"), "same_top_p": stats.get("same_top_p"),
        "first_divergent_layer": first_divergent[0], "divergent_sublayer": first_divergent[1],
        "embed_error": embed_error, "outtype": outtype, "stats": stats, "layers": layers,
        "thresholds": thresholds, **(meta or {}),
    }
    report["failures"] = check(report, thresholds)
    report["passed"] = not report["failures"]
    return report


def _fmt(x, spec=".6g") -> str:
    return "-" if x is None else format(x, spec)


def render_text(report: dict) -> str:
    """A human-readable summary and per-layer table."""
    s = report.get("stats", {})
    verdict = "PASSED" if report["passed"] else "FAILED: " + ", ".join(report["failures"])
    kp = s.get("kld_percentiles", {})
    lines = [
        f"outtype {report.get('outtype')}  tokens scored {s.get('n_tokens')}  {verdict}",
        f"PPL(Q)    {_fmt(report['ppl'])} +/- {_fmt(s.get('ppl_unc'))}",
        f"PPL(base) {_fmt(report['ppl_base'])} +/- {_fmt(s.get('ppl_base_unc'))}",
        (f"PPL ratio {_fmt(report['ppl_ratio'])} +/- {_fmt(s.get('ppl_ratio_unc'))}   "
         f"ln ratio {_fmt(s.get('ln_ppl_ratio'))} +/- {_fmt(s.get('ln_ppl_ratio_unc'))}"),
        (f"mean KLD  {_fmt(report['kld_mean'])} +/- {_fmt(s.get('kld_unc'))}   "
         f"max {_fmt(kp.get('max'))}   99% {_fmt(kp.get('99'))}"),
        (f"same top  {_fmt(report['same_top_p'])} +/- {_fmt(s.get('same_top_p_unc'))}   "
         f"RMS dp {_fmt(s.get('dp_rms'))}"),
        (f"first divergent layer {_fmt(report['first_divergent_layer'], '')} "
         f"({report.get('divergent_sublayer') or '-'})   embed error {_fmt(report.get('embed_error'), '.3g')}"),
    ]
    if report.get("layers"):
        lines.append(f"{'layer':>5} {'rel_err':>9} {'cosine':>9} {'route%':>7} "
                     f"{'attn_loc':>9} {'moe_loc':>9} {'lroute%':>7}")
        for r in report["layers"]:
            lines.append(f"{r['layer']:>5} {r['rel_error']:>9.3g} {r['cosine']:>9.6f} "
                         f"{100 * r['routing_disagreement']:>7.2f} {r['attn_error']:>9.3g} {r['moe_error']:>9.3g} "
                         f"{100 * r['local_routing_disagreement']:>7.2f}")
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    """Per-layer errors (log scale) and the per-token KLD histogram, saved to `path` (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    layers = report.get("layers") or []
    xs = [r["layer"] for r in layers]
    for key in ("rel_error", "attn_error", "moe_error"):
        ax1.plot(xs, [max(r[key], 1e-12) for r in layers], marker="o", label=key)
    ax1.set(yscale="log", xlabel="layer", ylabel="relative error", title="per-layer error")
    ax1.legend()
    hist = report.get("stats", {}).get("kld_histogram") or {}
    if hist.get("counts"):
        ax2.stairs(hist["counts"], hist["edges"])
        ax2.set(xscale="log")
    ax2.set(xlabel="KLD per token", ylabel="tokens", title=f"KLD (zeros: {hist.get('zeros', 0)})")
    fig.tight_layout()
    from ..io.atomic import atomic_output
    with atomic_output(Path(path), directory=False) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
