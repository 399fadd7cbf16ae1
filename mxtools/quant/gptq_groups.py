"""Quantizing Linears in groups: the weights of a group share one Hessian ([q, k, v]; an expert's [w1, w3]) and
are stacked along the rows into one GPTQ problem (GPTQ treats rows independently); groups of one stacked shape
(the experts of a layer) go through one GPTQ batch, so each column loop runs once for all of them
(gptq.gptq_quantize_batch). A group without enough calibration tokens, or whose GPTQ fails at every damping, is
rounded to nearest instead, and each weight gets its report entry.
"""
from __future__ import annotations

import torch

from .gptq import GPTQError, Hessian, QuantConfig, QuantResult, gptq_quantize_batch, rtn_quantize


def quantize_weights(jobs: list, cfg: QuantConfig, method: str, min_tokens: int) -> list[list]:
    """Quantize groups of weights, each group (Hessian or None, [w, ...]) sharing one Hessian: a group's weights
    are stacked along the rows into one problem (GPTQ treats rows independently) and the groups of one shape go
    through one GPTQ batch (gptq.gptq_quantize_batch). A group whose Hessian saw fewer than min_tokens tokens, or
    whose GPTQ fails at every damping, is rounded to nearest instead. Per weight: (result on the CPU, entry)."""
    done: list = [None] * len(jobs)
    batches: dict = {}  # stacked shape -> indices of the groups that GPTQ quantizes
    for j, (hess, ws) in enumerate(jobs):
        n = hess.n_tokens if hess is not None else 0
        if method == "gptq" and n >= max(min_tokens, 1):
            batches.setdefault((sum(w.shape[0] for w in ws), ws[0].shape[1]), []).append(j)
        else:
            done[j] = _rounded(hess, ws, cfg, f"{n} calibration tokens < min_tokens {min_tokens}"
                               if method == "gptq" else None)
    for idx in batches.values():
        for j, results in zip(idx, _gptq_groups([jobs[j] for j in idx], cfg)):
            done[j] = results
    return done


def _gptq_groups(jobs: list, cfg: QuantConfig) -> list[list]:
    """GPTQ of groups of one stacked shape in one batch; when it fails, each group alone (a failing one rounded)."""
    try:
        stacked = [torch.cat(ws) if len(ws) > 1 else ws[0] for _, ws in jobs]
        results = gptq_quantize_batch(stacked, [hess.matrix for hess, _ in jobs], cfg)
        del stacked
    except GPTQError as exc:  # Cholesky failed at every damping, or non-finite input: find which group
        if len(jobs) > 1:
            return [_gptq_groups([job], cfg)[0] for job in jobs]
        return [_rounded(jobs[0][0], jobs[0][1], cfg, f"gptq failed: {exc}", loss=False)]
    return [_split(res, ws, hess.n_tokens, cfg) for res, (hess, ws) in zip(results, jobs)]


def _split(res: QuantResult, ws: list, tokens: int, cfg: QuantConfig) -> list:
    """A stacked group's result cut back into its weights' (result, entry)."""
    out, start = [], 0
    for w in ws:
        end = start + w.shape[0]
        part = res if len(ws) == 1 else QuantResult(
            res.q[start:end], res.scales[:, start:end], res.zeros[:, start:end], res.g_idx,
            float(res.row_loss[start:end].sum()), res.damp, res.method, res.cfg, res.row_loss[start:end])
        out.append(_with_entry(part, tokens, cfg, None))
        start = end
    return out


def _rounded(hess: Hessian | None, ws: list, cfg: QuantConfig, reason: str | None, loss: bool = True) -> list:
    """Round-to-nearest of each weight; with `loss`, the loss with the Hessian when it saw any token (comparable to
    GPTQ's; not with a Hessian GPTQ could not use)."""
    n = hess.n_tokens if hess is not None else 0
    h = hess.matrix() if n and loss else None
    return [_with_entry(rtn_quantize(w, cfg, h), n, cfg, reason) for w in ws]


def _with_entry(res: QuantResult, tokens: int, cfg: QuantConfig, reason: str | None) -> tuple[QuantResult, dict]:
    entry = {"method": res.method, "tokens": tokens, "loss": res.loss, "damp": res.damp}
    if reason:
        entry["fallback"] = reason
    if res.damp is not None and res.damp > cfg.damp:
        entry["damp_raised"] = True
    return _to_cpu(res), entry


def _to_cpu(res: QuantResult) -> QuantResult:
    res.q, res.scales, res.zeros, res.g_idx = (t.cpu() for t in (res.q, res.scales, res.zeros, res.g_idx))
    return res
