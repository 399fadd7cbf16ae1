"""GPTQ (Frantar et al., 2022) and round-to-nearest for one Linear weight, in fp32 torch (CPU or CUDA); GPTQ also for
a batch of weights of one shape with their own Hessians, in one set of column loops (gptq_quantize_batch: every
step of a loop runs once for the batch, which on a GPU costs about what one weight does).

Follows the reference implementations (IST-DASLab/gptq, AutoGPTQ, GPTQModel) with these deliberate choices:
- Scales are rounded to fp16 *before* the codes are chosen, so the codes are optimal for the scale a loader
  actually reads from the checkpoint, and `QuantResult.dequantize()` equals the loader's weight bit for bit.
- Symmetric mode always uses the range [-absmax, absmax]. The reference keeps xmin = 0 for an all-positive row,
  which with the fixed zero 2^(bits-1) clips the row at about half its maximum; we do not reproduce that quirk.
- Asymmetric zeros are kept >= 1 because v1 checkpoints store zero - 1 (see gptq_grid, the quantization grid).
- A group's scale/zero is found from the columns' current (error-updated) values. The reference reads the
  block-start values when a group starts in the middle of a 128-column block (group sizes below 128).
- A Hessian without any live column (no calibration tokens) falls back to round-to-nearest: the reference would
  zero the whole matrix (every column "dead").
- When the Cholesky fails, the damping is doubled (from at least 1%) until it succeeds; `QuantResult.damp` reports
  the fraction of mean(diag(H)) actually used.

Quality levers beyond the reference (QuantConfig; their measured effects are in docs/BENCHMARKS.md, GPTQ levers):
group-aware column order (act_group_aware, as GPTQModel), a range search per group that minimises the rounding
error weighted by GPTQ's own column costs (search="hessian"), a least-squares re-fit of each row's group
scales after the loop, codes kept (refit), a second GPTQ pass on the re-fitted scales kept fixed, then
re-fitted again (repass), and coordinate-descent sweeps over the codes, scales kept, each followed by a re-fit
(sweeps). `gptaq_target` turns the asymmetric objective (GPTAQ: quantize towards the
unquantized model's outputs) into the weight that plain GPTQ then approximates. The output format is unchanged
(GPTQ v1; g_idx stays i // g unless act_order).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import MxError, ShapeError
from ..core.values import is_kind
from .gptq_grid import SEARCHES, find_params, grid_codes
from .gptq_refine import BLOCK_SIZE, ResultBatch, descend_codes, one_cpu_thread, refit_scales

SUPPORTED_BITS = (2, 4, 8)  # widths that pack whole codes into an int32 (v1 packing of 3 bits is not done)
DAMP_RETRIES = 12  # 0.01 doubled 12 times is ~41x mean(diag(H)): past that H is not a Hessian


class GPTQError(MxError):
    """GPTQ cannot run on these inputs (non-finite weights or Hessian, Cholesky failing at any damping)."""


@dataclass
class QuantConfig:
    """How to quantize: bits, group size (-1 = one group per row), symmetric, act-order, damping, ...

    act_order: columns in descending diag(H) order, g_idx not monotone (desc_act). act_group_aware: groups kept
    whole and taken by descending largest diag(H), columns inside each by descending diag(H) (g_idx stays
    i // g); ignored with act_order. mse: the reference's |err|^2.4 shrink search of each group's range.
    search "hessian": each group's range factor chosen to minimise the GPTQ-weighted squared rounding error
    (weights 1 / Hinv[c, c]^2, the cost GPTQ charges for column c). refit: after the loop, each output row's
    group scales re-chosen by least squares against tr((W - Q) H (W - Q)^T) with the codes kept. repass (with
    refit, without act_order): GPTQ's loop once more with the re-fitted scales fixed, then a re-fit. sweeps: that
    many coordinate-descent sweeps over the codes (each code to the grid point nearest its exact minimiser), each
    followed by a re-fit.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    damp: float = 0.01
    static_groups: bool = False
    mse: bool = False
    act_group_aware: bool = False
    search: str = "minmax"
    refit: bool = False
    sweeps: int = 0
    repass: bool = False

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; use one of {SUPPORTED_BITS}")
        if not is_kind(self.group_size, int) or (self.group_size < 1 and self.group_size != -1):
            raise ValueError(f"group_size={self.group_size!r} must be -1 (one group) or a positive integer")
        if not (is_kind(self.damp, float) and 0 <= self.damp < 1):
            raise ValueError(f"damp={self.damp!r} must be a fraction in [0, 1), e.g. 0.01")
        if not is_kind(self.sweeps, int) or not 0 <= self.sweeps <= 16:
            raise ValueError(f"sweeps={self.sweeps!r} must be an integer from 0 to 16")
        if self.search not in SEARCHES:
            raise ValueError(f"search={self.search!r} must be one of {', '.join(SEARCHES)}")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def group_len(self, in_features: int) -> int:
        """Columns per group for a weight with `in_features` columns; ValueError if they do not divide."""
        if self.group_size == -1:
            return in_features
        if in_features % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide in_features={in_features}; "
                             "use a divisor of it or -1")
        return self.group_size


@dataclass
class QuantResult:
    """Integer codes and per-group parameters of one quantized weight, in the weight's own [out, in] order."""

    q: torch.Tensor  # uint8 [out, in], codes in [0, 2^bits - 1]
    scales: torch.Tensor  # float32 [n_groups, out], every value exactly representable in fp16
    zeros: torch.Tensor  # int32 [n_groups, out], the integer zero point (not the stored zero - 1)
    g_idx: torch.Tensor  # int32 [in], group of each input column
    loss: float | None  # 0.5 * tr((W - Q) H (W - Q)^T); for GPTQ with the damped H; None if no H known
    damp: float | None  # fraction of mean(diag(H)) added to the diagonal (None for RTN)
    method: str  # "gptq" or "rtn"
    cfg: QuantConfig
    row_loss: torch.Tensor | None = None  # [out] float64: each row's share of `loss` (GPTQ only)

    @property
    def bits(self) -> int:
        return self.cfg.bits

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    def dequantize(self) -> torch.Tensor:
        """The fake-quantized weight [out, in] in float32, as a loader computes it from the fp16 scales."""
        scale = self.scales.to(torch.float16).float()[self.g_idx.long()].T
        zero = self.zeros.float()[self.g_idx.long()].T
        return scale * (self.q.float() - zero)


class Hessian:
    """Accumulates H = (2/n) * sum X^T X of one Linear's inputs in fp32, n counted in tokens.

    cross=True also accumulates C = (2/n) * sum X_fp^T X, X_fp the same tokens' inputs in the unquantized model
    (the asymmetric objective, `gptaq_target`); `add` then needs both.
    """

    def __init__(self, in_features: int, device=None, cross: bool = False):
        self.in_features = in_features
        self.n_tokens = 0
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._cross = torch.zeros_like(self._sum) if cross else None

    def add(self, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        """Add a batch of inputs [..., in_features] (any float dtype; empty batches are fine), and with cross=True
        the unquantized model's inputs x_fp of the same tokens (same shape)."""
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"Hessian input has {x.shape[-1]} features, expected {self.in_features}")
        x = x.detach().reshape(-1, self.in_features).to(self._sum.device, torch.float32)
        if self._cross is not None:
            if x_fp is None or x_fp.numel() != x.numel():
                raise ShapeError("a cross Hessian needs the unquantized inputs of the same tokens")
            x_fp = x_fp.detach().reshape(-1, self.in_features).to(self._sum.device, torch.float32)
        if x.shape[0]:
            self._sum.addmm_(x.T, x)
            if self._cross is not None:
                self._cross.addmm_(x_fp.T, x)
            self.n_tokens += x.shape[0]

    def matrix(self) -> torch.Tensor:
        """H as a new [in, in] float32 tensor (all zeros when no token was added)."""
        if self.n_tokens == 0:
            return torch.zeros_like(self._sum)
        return self._sum * (2.0 / self.n_tokens)

    def cross_matrix(self) -> torch.Tensor | None:
        """C = (2/n) sum X_fp^T X as a new [in, in] tensor; None without cross."""
        if self._cross is None:
            return None
        if self.n_tokens == 0:
            return torch.zeros_like(self._cross)
        return self._cross * (2.0 / self.n_tokens)


def gptaq_target(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, alpha: float = 1.0,
                ridge: float = 0.05) -> torch.Tensor:
    """The weight W' that GPTQ on the quantized stream's Hessian H should approximate for the asymmetric objective
    (GPTAQ, Li et al. 2025): min_Q ||X_fp W^T - X Q^T||^2 = ||X (W' - Q)^T||^2 + const with W' = W C H^-1,
    X the inputs the already-quantized model gives this Linear, X_fp the unquantized model's, C = X_fp^T X.

    The least-squares correction is damped towards W (ridge regression, lam = ridge * mean(diag(H))):
    W' = W + alpha * W (C - H) (H + lam I)^-1, alpha scaling the correction (GPTAQ's alpha; 1 = the whole one).
    Columns without input (diag(H) == 0) get no correction."""
    w = w.detach().float()
    h = h.to(w.device, torch.float32)
    c = c.to(w.device, torch.float32)
    mean_diag = float(torch.diagonal(h).mean())
    if mean_diag <= 0 or alpha == 0:
        return w
    hd = h.clone()
    hd.diagonal().add_(max(ridge, 1e-6) * mean_diag)
    d = c - h
    d[:, torch.diagonal(h) == 0] = 0  # a column the quantized stream never feeds gets no correction
    # W (C - H) (H + lam)^-1 = ((H + lam)^-1 (C - H)^T W^T)^T, H symmetric; solve instead of inverting.
    corr = torch.linalg.solve(hd, d.T @ w.T).T
    out = w + alpha * corr
    return out if bool(torch.isfinite(out).all()) else w


# ---------------------------------------------------------------- round to nearest

def rtn_quantize(w: torch.Tensor, cfg: QuantConfig, h: torch.Tensor | None = None) -> QuantResult:
    """Round-to-nearest with the same quantizer and grouping; `loss` uses H when given, else None."""
    _check_weight(w)
    rows, cols = w.shape
    g = cfg.group_len(cols)
    w = w.detach().float().contiguous()
    # Every (row, group) pair at once: quantizer rows are [g]-long slices of the weight.
    scale, zero = find_params(w.view(rows * (cols // g), g), cfg)
    scale, zero = scale.view(rows, cols // g, 1), zero.view(rows, cols // g, 1)
    codes = grid_codes(w.view(rows, cols // g, g), scale, zero, cfg.maxq).to(torch.uint8).view(rows, cols)
    g_idx = (torch.arange(cols, device=w.device) // g).to(torch.int32)
    res = QuantResult(codes, scale[..., 0].T.contiguous(), zero[..., 0].T.to(torch.int32).contiguous(), g_idx,
                      None, None, "rtn", cfg)
    if h is not None:
        res.loss = objective(w, res.dequantize(), h.to(w.device, torch.float32))
    return res


def objective(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """0.5 * tr((W - Q) H (W - Q)^T): the GPTQ loss (proportional to the output error on the calibration data)."""
    return float(row_objective(w, q, h).sum())


def row_objective(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Each output row's share of the GPTQ loss, [..., out] float64 (w, q [..., out, in], h [..., in, in])."""
    d = (w - q).float()
    return 0.5 * (torch.matmul(d, h) * d).sum(-1, dtype=torch.float64)


# ---------------------------------------------------------------- GPTQ

def gptq_quantize(w: torch.Tensor, h: torch.Tensor, cfg: QuantConfig,
                  blocksize: int = BLOCK_SIZE) -> QuantResult:
    """GPTQ-quantize weight w [out, in] given the Hessian h [in, in] of its inputs."""
    return gptq_quantize_batch([w], [h], cfg, blocksize)[0]


def gptq_quantize_batch(ws: list[torch.Tensor], hs: list, cfg: QuantConfig,
                        blocksize: int = BLOCK_SIZE) -> list[QuantResult]:
    """GPTQ of several weights of one shape, each with its own Hessian ([in, in] tensors, or callables giving one,
    called one at a time), in one set of column loops: each step of a loop runs once for the whole batch. On a GPU
    the loops cost kernel launches per column rather than arithmetic, so a layer's experts cost about what one
    does. Every result is what the weight alone gets, up to float summation order; each result's `row_loss`
    holds its rows' shares of the loss (to split a weight made of several stacked along the rows)."""
    if not ws or len(ws) != len(hs):
        raise ValueError("gptq_quantize_batch needs one Hessian per weight, and at least one weight")
    for w in ws:
        _check_weight(w)
    if len({tuple(w.shape) for w in ws}) > 1:
        raise ShapeError(f"a GPTQ batch needs weights of one shape, got {sorted({tuple(w.shape) for w in ws})}")
    cols = ws[0].shape[1]
    g = cfg.group_len(cols)
    h = _stacked_hessians(hs, cols, ws[0].device)
    dead = torch.diagonal(h, dim1=1, dim2=2) == 0
    if bool(dead.all(1).any()):  # a weight without any calibration signal: GPTQ would zero it, round it instead
        del h
        return _without_signal(ws, hs, dead.all(1).tolist(), cfg, blocksize)
    w = torch.stack([x.detach().to(torch.float32) for x in ws])  # [B, out, in], a copy
    # A column that never saw a nonzero input cannot affect the output: drop it, keep H invertible.
    torch.diagonal(h, dim1=1, dim2=2)[dead] = 1
    w.masked_fill_(dead.unsqueeze(1), 0)
    perm = _processing_order(torch.diagonal(h, dim1=1, dim2=2), g, cfg)
    static = _static_params(w, g, cfg) if cfg.static_groups else None
    hinv, damp = _inverse_cholesky_batch(h, cfg.damp, perm)
    # Only the re-fit and the sweeps need H after the inverse, damped as the loop's: that one copy, made in place.
    hd = _damp_(h, damp) if cfg.refit or cfg.sweeps else None
    del h
    whd = torch.bmm(w, hd) if cfg.refit else None  # W Hd, the same for every re-fit
    base = torch.arange(cols, device=w.device).expand(len(ws), cols) // g
    col_group = base if perm is None or (cfg.act_order and static is None) else base.gather(1, perm)
    res = _gptq_pass(w, hinv, cfg, g, perm, col_group, static, blocksize)
    if cfg.refit:
        res.scales = refit_scales(whd, hd, res)
        if cfg.repass and not cfg.act_order:  # GPTQ again on the re-fitted scales, kept fixed; re-fit again
            res = _gptq_pass(w, hinv, cfg, g, perm, col_group, (res.scales.clone(), res.zeros.float()), blocksize)
            res.scales = refit_scales(whd, hd, res)
    for _ in range(cfg.sweeps):
        res.q = descend_codes(w, hd, res, cfg.maxq, blocksize)
        if cfg.refit:
            res.scales = refit_scales(whd, hd, res)
    if hd is not None:
        res.row_loss = row_objective(w, res.dequantize(), hd)
    return [QuantResult(res.q[b], res.scales[b], res.zeros[b], res.g_idx[b], float(res.row_loss[b].sum()),
                        damp[b], "gptq", cfg, res.row_loss[b]) for b in range(len(ws))]


def _stacked_hessians(hs: list, cols: int, device) -> torch.Tensor:
    """The Hessians as one [B, in, in] float32 tensor, each made (when callable) and copied in turn."""
    h = torch.empty(len(hs), cols, cols, dtype=torch.float32, device=device)
    for b, x in enumerate(hs):
        x = x() if callable(x) else x
        if tuple(x.shape) != (cols, cols):
            raise ShapeError(f"Hessian shape {tuple(x.shape)} does not fit a weight with {cols} input columns")
        h[b] = x.detach()
        del x
        if not bool(torch.isfinite(h[b]).all()):
            raise GPTQError("Hessian has NaN or infinite values")
    return h


def _without_signal(ws, hs, none: list, cfg, blocksize) -> list[QuantResult]:
    """Round the weights whose Hessian is all zeros, GPTQ the others."""
    live = [(w, h) for w, h, n in zip(ws, hs, none) if not n]
    done = iter(gptq_quantize_batch(*map(list, zip(*live)), cfg, blocksize) if live else ())
    return [rtn_quantize(w, cfg) if n else next(done) for w, n in zip(ws, none)]


def _processing_order(diag: torch.Tensor, g: int, cfg: QuantConfig) -> torch.Tensor | None:
    """The column order of the loop [B, in] from diag(H) [B, in]: None (natural), act-order (descending
    diag(H)), or group-aware.

    Group-aware (GPTQModel's act_group_aware, after Gafni et al. 2025): groups by descending largest diag(H),
    each group's columns by descending diag(H); groups stay whole, so g_idx stays i // g.
    """
    if cfg.act_order:
        return torch.argsort(diag, dim=1, descending=True, stable=True)
    if not cfg.act_group_aware:
        return None
    values, local = torch.sort(diag.view(diag.shape[0], -1, g), dim=2, descending=True, stable=True)
    groups = torch.argsort(values[:, :, 0], dim=1, descending=True, stable=True)
    local = local + g * torch.arange(local.shape[1], device=diag.device)[:, None]
    return local.gather(1, groups.unsqueeze(-1).expand(-1, -1, g)).reshape(diag.shape[0], -1)


def _gptq_pass(w, hinv, cfg, g, perm, col_group, static, blocksize) -> ResultBatch:
    """One GPTQ column loop over w [B, out, in] in `perm` order; the results in the weights' own column order."""
    # The loop works on W^T [in, out]: each column becomes a contiguous row (2-3x faster updates on CPU).
    wt = w.transpose(1, 2)
    wt = (wt if perm is None else wt.gather(1, perm.unsqueeze(-1).expand(-1, -1, wt.shape[2]))).contiguous()
    codes_t, scales, zeros, row_loss = _gptq_loop(wt, hinv, cfg, g, col_group, static, blocksize)
    g_idx = col_group
    if perm is not None:  # back to the weights' own column order
        inv = torch.argsort(perm, dim=1)
        codes_t = codes_t.gather(1, inv.unsqueeze(-1).expand(-1, -1, codes_t.shape[2]))
        g_idx = col_group.gather(1, inv)
    return ResultBatch(codes_t.transpose(1, 2).contiguous(), scales, zeros.to(torch.int32), g_idx.to(torch.int32),
                  row_loss)


def _damp_(h: torch.Tensor, damp: list[float]) -> torch.Tensor:
    """H [B, in, in] plus each one's damping fraction of its mean diagonal, in place."""
    add = torch.tensor(damp, dtype=torch.float64, device=h.device) * torch.diagonal(h, dim1=1, dim2=2).mean(1)
    h.diagonal(dim1=1, dim2=2).add_(add.float().unsqueeze(1))
    return h


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ShapeError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise GPTQError("weight has NaN or infinite values")


def _static_params(w, g, cfg):
    """All groups' (scales, zeros) [B, n_groups, out] from the original weights, in column order."""
    params = [find_params(w[:, :, c:c + g], cfg) for c in range(0, w.shape[2], g)]
    return torch.stack([p[0] for p in params], 1), torch.stack([p[1] for p in params], 1)


def _inverse_cholesky_batch(h: torch.Tensor, damp: float, perm: torch.Tensor | None = None):
    """inverse_cholesky of each H [B, in, in] (rows and columns in its `perm` order when given): the factors
    [B, in, in] and each one's damping. One at a time: the factorizations are arithmetic-bound (a batch gains
    nothing) and their temporary copies stay those of one H."""
    upper = torch.empty_like(h)
    used = []
    for b in range(h.shape[0]):
        hb = h[b] if perm is None else h[b][perm[b]][:, perm[b]]
        upper[b], damp_b = inverse_cholesky(hb, damp)
        used.append(damp_b)
        del hb
    return upper, used


def inverse_cholesky(h: torch.Tensor, damp: float):
    """Upper Cholesky factor U of (H + damp*mean(diag) I)^-1 for one H [in, in], doubling the damping while the
    Cholesky fails; (U, the damping used)."""
    mean_diag = float(torch.diagonal(h).mean())
    for _ in range(DAMP_RETRIES + 1):
        upper = _upper_inverse_factor(h, damp * mean_diag)
        if upper is not None:
            return upper, damp
        damp = max(2 * damp, 0.01)
    raise GPTQError(f"Cholesky of the Hessian failed even with damping {damp / 2:g} x mean(diag(H)); "
                    "the Hessian is not positive semi-definite (check the calibration inputs)")


def _upper_inverse_factor(h: torch.Tensor, add: float) -> torch.Tensor | None:
    """U with U^T U = (H + add I)^-1, or None when H + add I is not positive definite.

    The reference computes cholesky -> cholesky_inverse -> cholesky(upper). With J the reversal permutation,
    J H J = L L^T gives H^-1 = (J L^-T J)(J L^-1 J), so U = J L^-1 J: one factorization and one triangular
    solve, about 1.6x faster on CPU, and no second factorization of the (worse conditioned) inverse.
    """
    hd = h.flip(0, 1)
    hd.diagonal().add_(add)
    lower, info = torch.linalg.cholesky_ex(hd)
    del hd
    if int(info) != 0:
        return None
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    upper = torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
    return upper if bool(torch.isfinite(upper).all()) else None


class _Groups:
    """Per-group parameters [B, n_groups, out] filled or read during the loop, and the current column's (scale,
    zero, lowest and highest code less the zero) [B, out] for the whole batch."""

    def __init__(self, static, col_group: torch.Tensor, size: int, rows: int, maxq: int):
        bsz, cols = col_group.shape
        self.dynamic = static is None
        if self.dynamic:
            shape = (bsz, cols // size, rows)
            static = (torch.zeros(shape, device=col_group.device), torch.zeros(shape, device=col_group.device))
        self.scales, self.zeros = static
        self.col_group, self.size = col_group, size
        # Positions where some weight of the batch moves to another group: only there is (scale, zero) re-read.
        moved = torch.ones(cols, dtype=torch.bool, device=col_group.device)
        moved[1:] = (col_group[:, 1:] != col_group[:, :-1]).any(0)
        self.starts = set(moved.nonzero().squeeze(1).tolist())
        self.batch = torch.arange(bsz, device=col_group.device)
        self.maxq, self.current = maxq, None

    def at(self, col: int, find) -> tuple[torch.Tensor, ...]:
        """(scale, zero, -zero, maxq - zero) [B, out] for processed column `col`; `find()` gives a new group's
        (scale, zero) from current values."""
        if self.dynamic and col % self.size == 0:
            k = self.col_group[:, col]
            s, z = find()
            self.scales[self.batch, k], self.zeros[self.batch, k] = s, z
        elif col in self.starts:
            k = self.col_group[:, col]
            s, z = self.scales[self.batch, k], self.zeros[self.batch, k]
        else:
            return self.current
        self.current = s, z, -z, self.maxq - z
        return self.current


def _gptq_loop(wt, hinv, cfg, g, col_group, static, blocksize):
    """The column loop in blocks with lazy batch updates on wt = W^T [B, in, out] (updated in place).

    Returns codes^T [B, in, out], scales and zeros [B, n_groups, out], and each row's loss [B, out].
    """
    bsz, cols, rows = wt.shape
    groups = _Groups(static, col_group, g, rows, cfg.maxq)
    codes_t = torch.empty(bsz, cols, rows, dtype=torch.uint8, device=wt.device)
    row_loss = torch.zeros(bsz, rows, dtype=torch.float64, device=wt.device)  # no device sync per column
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = wt[:, i1:i2].clone()
        err1, codes1 = torch.zeros_like(w1), torch.empty_like(w1)
        with one_cpu_thread(wt.device):
            _quantize_block(wt, w1, err1, codes1, hinv, i1, groups, cfg)
        codes_t[:, i1:i2] = codes1
        # The whole block's update of the trailing columns in one matmul.
        wt[:, i2:].baddbmm_(hinv[:, i1:i2, i2:].transpose(1, 2), err1, alpha=-1)
        row_loss += 0.5 * err1.double().square().sum(1)
    return codes_t, groups.scales, groups.zeros, row_loss


def _quantize_block(wt, w1, err1, codes1, hinv, i1, groups: _Groups, cfg):
    """Quantize the block's columns (w1[:, i]) one by one, updating the rest of the block, recording errors and
    codes (err1, codes1). Eight kernels a column: on a GPU the loop's cost is their launches, not arithmetic."""
    n = w1.shape[1]
    hinv1 = hinv[:, i1:i1 + n, i1:i1 + n]
    d = hinv1.diagonal(dim1=1, dim2=2).unsqueeze(-1)  # [B, n, 1]

    def find(i, col):  # a group starts: its range from the columns' current values
        cur = _current_columns(wt, w1, err1, hinv, i1, i, groups.size)  # [B, g, out]
        cost = hinv.diagonal(dim1=1, dim2=2)[:, col:col + groups.size] ** -2 if cfg.search == "hessian" else None
        return find_params(cur.transpose(1, 2), cfg, None if cost is None else cost.unsqueeze(1))

    for i in range(n):
        col = i1 + i
        s, z, low, high = groups.at(col, lambda i=i, col=col: find(i, col))
        x = w1[:, i]
        r = torch.round(x / s).clamp_(low, high)  # the code less the zero: exactly gptq_grid.grid_codes(x) - z
        torch.add(r, z, out=codes1[:, i])
        e = torch.sub(x, s * r, out=err1[:, i]).div_(d[:, i])
        w1[:, i:].addcmul_(hinv1[:, i, i:, None], e.unsqueeze(1), value=-1)  # OBS update of the rest of the block


def _current_columns(wt, w1, err1, hinv, i1, i, g):
    """Up-to-date values [B, g, out] of the g columns from block position i, block updates not yet applied."""
    inside = w1[:, i:i + g]
    need = g - inside.shape[1]
    if need <= 0:
        return inside
    i2 = i1 + w1.shape[1]
    # Columns past the block still lack this block's updates from its first i columns.
    rest = wt[:, i2:i2 + need] - torch.bmm(hinv[:, i1:i1 + i, i2:i2 + need].transpose(1, 2), err1[:, :i])
    return torch.cat([inside, rest], dim=1)
