"""GPTQ (Frantar et al., 2022) and round-to-nearest for one Linear weight, in fp32 torch (CPU or CUDA).

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

Quality levers beyond the reference (QuantConfig; their measured effects are in docs/BENCHMARKS.md, issue 12):
group-aware column order (act_group_aware, as GPTQModel), a range search per group that minimises the rounding
error weighted by GPTQ's own column costs (search="hessian"), a least-squares re-fit of each row's group
scales after the loop, codes kept (refit), a second GPTQ pass on the re-fitted scales kept fixed, then
re-fitted again (repass), and coordinate-descent sweeps over the codes, scales kept, each followed by a re-fit
(sweeps). `asym_target` turns the asymmetric objective (GPTAQ: quantize towards the
unquantized model's outputs) into the weight that plain GPTQ then approximates. The output format is unchanged
(GPTQ v1; g_idx stays i // g unless act_order).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import MxError, ShapeError
from .gptq_grid import FP16_MAX, FP16_TINY, SEARCHES, _codes, _fp16_round, find_params

BLOCK_SIZE = 128  # columns per lazy-batch block, as in the reference
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
        if not isinstance(self.group_size, int) or (self.group_size < 1 and self.group_size != -1):
            raise ValueError(f"group_size={self.group_size!r} must be -1 (one group) or a positive integer")
        if not (isinstance(self.damp, (int, float)) and 0 <= self.damp < 1):
            raise ValueError(f"damp={self.damp!r} must be a fraction in [0, 1), e.g. 0.01")
        if not isinstance(self.sweeps, int) or isinstance(self.sweeps, bool) or not 0 <= self.sweeps <= 16:
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
    (the asymmetric objective, `asym_target`); `add` then needs both.
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


def asym_target(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, alpha: float = 1.0,
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
    codes = _codes(w.view(rows, cols // g, g), scale, zero, cfg.maxq).to(torch.uint8).view(rows, cols)
    g_idx = (torch.arange(cols, device=w.device) // g).to(torch.int32)
    res = QuantResult(codes, scale[..., 0].T.contiguous(), zero[..., 0].T.to(torch.int32).contiguous(), g_idx,
                      None, None, "rtn", cfg)
    if h is not None:
        res.loss = objective(w, res.dequantize(), h.to(w.device, torch.float32))
    return res


def objective(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """0.5 * tr((W - Q) H (W - Q)^T): the GPTQ loss (proportional to the output error on the calibration data)."""
    d = (w - q).float()
    return 0.5 * float(((d @ h) * d).sum())


# ---------------------------------------------------------------- GPTQ

def gptq_quantize(w: torch.Tensor, h: torch.Tensor, cfg: QuantConfig,
                  blocksize: int = BLOCK_SIZE) -> QuantResult:
    """GPTQ-quantize weight w [out, in] given the Hessian h [in, in] of its inputs."""
    _check_weight(w)
    cols = w.shape[1]
    g = cfg.group_len(cols)
    if tuple(h.shape) != (cols, cols):
        raise ShapeError(f"Hessian shape {tuple(h.shape)} does not fit a weight with {cols} input columns")
    w = w.detach().to(torch.float32, copy=True)
    h = h.detach().to(device=w.device, dtype=torch.float32, copy=True)
    if not bool(torch.isfinite(h).all()):
        raise GPTQError("Hessian has NaN or infinite values")
    dead = torch.diagonal(h) == 0
    if bool(dead.all()):  # no calibration signal at all: GPTQ would zero the whole matrix
        return rtn_quantize(w, cfg)
    # A column that never saw a nonzero input cannot affect the output: drop it, keep H invertible.
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = _processing_order(torch.diagonal(h), g, cfg)
    static = _static_params(w, g, cfg) if cfg.static_groups else None
    hp = h if perm is None else h[perm][:, perm]
    hinv, damp = _inverse_cholesky(hp, cfg.damp)
    del hp
    # Only the re-fit and the sweeps need H after the inverse, damped as the loop's: keep that one copy.
    hd = _damped(h, damp) if cfg.refit or cfg.sweeps else None
    del h
    base = torch.arange(cols, device=w.device) // g
    col_group = base if perm is None or (cfg.act_order and static is None) else base[perm]
    res = _gptq_pass(w, hinv, cfg, g, perm, col_group, static, blocksize, damp)
    if cfg.refit:
        res.scales = _refit_scales(w, hd, res)
        if cfg.repass and not cfg.act_order:  # GPTQ again on the re-fitted scales, kept fixed; re-fit again
            res = _gptq_pass(w, hinv, cfg, g, perm, col_group, (res.scales.clone(), res.zeros.float()), blocksize,
                             damp)
            res.scales = _refit_scales(w, hd, res)
    for _ in range(cfg.sweeps):
        res.q = _descend_codes(w, hd, res, blocksize)
        if cfg.refit:
            res.scales = _refit_scales(w, hd, res)
    if hd is not None:
        res.loss = objective(w, res.dequantize(), hd)
    return res


def _descend_codes(w: torch.Tensor, hd: torch.Tensor, res: QuantResult, blocksize: int = BLOCK_SIZE):
    """One cyclic coordinate-descent sweep over the codes (scales and zeros kept) on tr((W - Q) Hd (W - Q)^T):
    column j of every row moves to the grid point nearest its exact minimiser Q_j + G_j / Hd_jj, G = (W - Q) Hd
    (QuantEase, Behdin et al. 2023). Each step can only lower the objective. Returns the new codes [out, in]."""
    gi = res.g_idx.long()
    scale_t = res.scales.to(torch.float16).float()[gi].contiguous()  # [in, out], as the loader reads it
    zero_t = res.zeros.float()[gi].contiguous()
    codes_t = res.q.T.float().contiguous()
    q_t = scale_t * (codes_t - zero_t)
    grad_t = (hd @ (w.T - q_t)).contiguous()  # G^T = Hd (W - Q)^T, rows are columns of W
    diag = hd.diagonal()
    maxq = res.cfg.maxq
    cols = codes_t.shape[0]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        dq = torch.zeros(i2 - i1, codes_t.shape[1], dtype=q_t.dtype, device=q_t.device)
        with _one_cpu_thread(w.device):
            for j in range(i1, i2):
                target = q_t[j] + grad_t[j] / diag[j]
                c = torch.clamp(torch.round(target / scale_t[j]) + zero_t[j], 0, maxq)
                new = scale_t[j] * (c - zero_t[j])
                d = new - q_t[j]
                codes_t[j], q_t[j], dq[j - i1] = c, new, d
                grad_t[j + 1:i2].addr_(hd[j + 1:i2, j], d, alpha=-1)
        grad_t[i2:].addmm_(hd[i2:, i1:i2], dq, alpha=-1)
    return codes_t.T.to(torch.uint8).contiguous()


def _processing_order(diag: torch.Tensor, g: int, cfg: QuantConfig) -> torch.Tensor | None:
    """The column order of the loop: None (natural), act-order (descending diag(H)), or group-aware.

    Group-aware (GPTQModel's act_group_aware, after Gafni et al. 2025): groups by descending largest diag(H),
    each group's columns by descending diag(H); groups stay whole, so g_idx stays i // g.
    """
    if cfg.act_order:
        return torch.argsort(diag, descending=True, stable=True)
    if not cfg.act_group_aware:
        return None
    values, local = torch.sort(diag.view(-1, g), dim=1, descending=True, stable=True)
    groups = torch.argsort(values[:, 0], descending=True, stable=True)
    return (local + g * torch.arange(local.shape[0], device=diag.device)[:, None])[groups].reshape(-1)


def _gptq_pass(w, hinv, cfg, g, perm, col_group, static, blocksize, damp) -> QuantResult:
    """One GPTQ column loop over w [out, in] in `perm` order; the result in the weight's own column order."""
    # The loop works on W^T [in, out]: each column becomes a contiguous row (2-3x faster updates on CPU).
    wt = (w.T if perm is None else w.T[perm]).contiguous()
    codes_t, scales, zeros, loss = _gptq_loop(wt, hinv, cfg, g, col_group, static, blocksize)
    g_idx = col_group
    if perm is not None:  # back to the weight's own column order
        inv = torch.argsort(perm)
        codes_t, g_idx = codes_t[inv], col_group[inv]
    return QuantResult(codes_t.T.contiguous(), scales, zeros.to(torch.int32), g_idx.to(torch.int32), loss, damp,
                       "gptq", cfg)


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    out = h.clone()
    out.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    return out


def _refit_scales(w: torch.Tensor, hd: torch.Tensor, res: QuantResult) -> torch.Tensor:
    """Scales [n_groups, out] that minimise tr((W - Q) Hd (W - Q)^T), Hd the damped Hessian, with the codes kept:
    per output row, a least-squares problem in its n_groups scales (normal equations A s = b, A = C^T Hd C,
    b = C^T Hd w)."""
    gi = res.g_idx.long()
    n = res.n_groups
    c = res.q.float() - res.zeros.float()[gi].T  # [out, in]: centred codes, W ~ scale[g_idx] * c
    onehot = torch.nn.functional.one_hot(gi, n).to(c.dtype)  # [in, n]
    b = (c * (w @ hd)) @ onehot  # [out, n]
    a = torch.empty(c.shape[0], n, n, dtype=c.dtype, device=c.device)
    for k in range(n):
        cols = (gi == k).nonzero().squeeze(1)
        a[:, :, k] = (c * (c[:, cols] @ hd[cols])) @ onehot
    old = res.scales.T  # [out, n]
    empty = torch.diagonal(a, dim1=1, dim2=2) <= 0  # a group whose codes are all at the zero point
    a = a + torch.diag_embed(empty.to(a.dtype))
    b = torch.where(empty, old, b)
    new = torch.linalg.solve(a, b)
    ok = torch.isfinite(new) & (new > FP16_TINY) & (new < FP16_MAX)
    return _fp16_round(torch.where(ok, new, old)).T.contiguous()


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ShapeError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise GPTQError("weight has NaN or infinite values")


def _static_params(w, g, cfg):
    """All groups' (scales, zeros) [n_groups, out] from the original weight, in column order."""
    params = [find_params(w[:, c:c + g], cfg) for c in range(0, w.shape[1], g)]
    return torch.stack([p[0] for p in params]), torch.stack([p[1] for p in params])


def _inverse_cholesky(h: torch.Tensor, damp: float):
    """Upper Cholesky factor U of (H + damp*mean(diag) I)^-1, doubling the damping while the Cholesky fails."""
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


@dataclass
class _Groups:
    """Per-group parameters filled during the loop, and which group each processed column belongs to."""

    scales: torch.Tensor  # [n_groups, out]
    zeros: torch.Tensor  # [n_groups, out]
    of_column: list  # group of each processed column position
    size: int
    dynamic: bool  # found when the loop reaches a group's first column (not static)


def _gptq_loop(wt, hinv, cfg, g, col_group, static, blocksize):
    """The column loop in blocks with lazy batch updates on wt = W^T [in, out] (updated in place).

    Returns codes^T [in, out], scales and zeros [n_groups, out], and the loss.
    """
    cols, rows = wt.shape
    dynamic = static is None
    if dynamic:
        static = (torch.zeros(cols // g, rows, device=wt.device), torch.zeros(cols // g, rows, device=wt.device))
    groups = _Groups(*static, col_group.tolist(), g, dynamic)
    codes_t = torch.empty(cols, rows, dtype=torch.uint8, device=wt.device)
    loss = torch.zeros((), dtype=torch.float64, device=wt.device)  # a tensor: no device sync per column
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        with _one_cpu_thread(wt.device):
            _quantize_block(wt, w1, err1, hinv, i1, codes_t, groups, cfg)
        # The whole block's update of the trailing columns in one matmul.
        wt[i2:].addmm_(hinv[i1:i2, i2:].T, err1, alpha=-1)
        loss += 0.5 * err1.double().square().sum()
    return codes_t, groups.scales, groups.zeros, float(loss)


def _quantize_block(wt, w1, err1, hinv, i1, codes_t, groups: _Groups, cfg):
    """Quantize the block's columns (rows of w1) one by one, updating the rest of the block, recording errors."""
    hinv1 = hinv[i1:i1 + w1.shape[0], i1:i1 + w1.shape[0]]
    for i in range(w1.shape[0]):
        col = i1 + i
        k = groups.of_column[col]
        if groups.dynamic and col % groups.size == 0:  # a new group starts: its range from current values
            cur = _current_columns(wt, w1, err1, hinv, i1, i, groups.size)
            cost = hinv.diagonal()[col:col + groups.size] ** -2 if cfg.search == "hessian" else None
            groups.scales[k], groups.zeros[k] = find_params(cur.T, cfg, cost)
        s, z = groups.scales[k], groups.zeros[k]
        x = w1[i]
        code = _codes(x, s, z, cfg.maxq)
        e = (x - s * (code - z)) / hinv1[i, i]
        codes_t[col] = code.to(torch.uint8)
        w1[i:].addr_(hinv1[i, i:], e, alpha=-1)  # OBS update of the rest of the block
        err1[i] = e


@contextmanager
def _one_cpu_thread(device: torch.device):
    """Run the per-column ops on one CPU thread: on [out, <=128] tensors OpenMP's fork/join costs more than the
    work (measured 100x slower per op with 2 threads when other processes share the cores)."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _current_columns(wt, w1, err1, hinv, i1, i, g):
    """Up-to-date values [g, out] of the g columns from block position i, with block updates not yet applied."""
    inside = w1[i:i + g]
    need = g - inside.shape[0]
    if need <= 0:
        return inside
    i2 = i1 + w1.shape[0]
    # Columns past the block still lack this block's updates from its first i columns.
    rest = wt[i2:i2 + need] - hinv[i1:i1 + i, i2:i2 + need].T @ err1[:i]
    return torch.cat([inside, rest], dim=0)
