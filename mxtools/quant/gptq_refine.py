"""The steps after GPTQ's column loop, on a batch of results: each row's group scales re-fitted by least squares
with the codes kept, and coordinate-descent sweeps over the codes with the scales kept (gptq.QuantConfig refit,
repass, sweeps; their measured effects are in docs/BENCHMARKS.md, GPTQ levers)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .gptq_grid import FP16_MAX, FP16_TINY, fp16_round

BLOCK_SIZE = 128  # columns per lazy-batch block, as in the reference GPTQ


@dataclass
class ResultBatch:
    """A batch of results in the weights' own column order: q [B, out, in] uint8, scales/zeros [B, n_groups, out],
    g_idx [B, in], row_loss [B, out] float64."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    row_loss: torch.Tensor

    def per_column(self, t: torch.Tensor) -> torch.Tensor:
        """A per-group tensor [B, n_groups, out] spread to the columns: [B, in, out]."""
        return t.gather(1, self.g_idx.long().unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    def dequantize(self) -> torch.Tensor:
        scale = self.per_column(self.scales.to(torch.float16).float())
        return (scale * (self.q.transpose(1, 2).float() - self.per_column(self.zeros.float()))).transpose(1, 2)



def refit_scales(whd: torch.Tensor, hd: torch.Tensor, res: ResultBatch) -> torch.Tensor:
    """Scales [B, n_groups, out] that minimise tr((W - Q) Hd (W - Q)^T), Hd the damped Hessian, with the codes
    kept (whd = W Hd): per output row, a least-squares problem in its n_groups scales (normal equations A s = b,
    A = C^T Hd C, b = C^T Hd w)."""
    gi = res.g_idx.long()  # [B, in]
    bsz, n, out_f = res.scales.shape
    size = gi.shape[1] // n  # every group holds in / n_groups columns
    c = res.q.float() - res.per_column(res.zeros.float()).transpose(1, 2)  # [B, out, in]: W ~ scale[g_idx] * c
    onehot = torch.nn.functional.one_hot(gi, n).to(c.dtype)  # [B, in, n]
    b = torch.bmm(c * whd, onehot)  # [B, out, n]
    a = torch.empty(bsz, out_f, n, n, dtype=c.dtype, device=c.device)
    order = torch.argsort(gi, dim=1, stable=True)  # each group's columns together, ascending
    for k in range(n):
        cols = order[:, k * size:(k + 1) * size]
        ck = c.gather(2, cols.unsqueeze(1).expand(-1, out_f, -1))  # [B, out, size]
        hk = hd.gather(1, cols.unsqueeze(2).expand(-1, -1, hd.shape[2]))  # [B, size, in]
        a[..., k] = torch.bmm(c * torch.bmm(ck, hk), onehot)
    old = res.scales.transpose(1, 2)  # [B, out, n]
    empty = torch.diagonal(a, dim1=2, dim2=3) <= 0  # a group whose codes are all at the zero point
    a = a + torch.diag_embed(empty.to(a.dtype))
    b = torch.where(empty, old, b)
    new = torch.linalg.solve(a, b)
    ok = torch.isfinite(new) & (new > FP16_TINY) & (new < FP16_MAX)
    return fp16_round(torch.where(ok, new, old)).transpose(1, 2).contiguous()


def descend_codes(w: torch.Tensor, hd: torch.Tensor, res: ResultBatch, maxq: int, blocksize: int = BLOCK_SIZE):
    """One cyclic coordinate-descent sweep over the codes (scales and zeros kept) on tr((W - Q) Hd (W - Q)^T):
    column j of every row moves to the grid point nearest its exact minimiser Q_j + G_j / Hd_jj, G = (W - Q) Hd
    (QuantEase, Behdin et al. 2023). Each step can only lower the objective. Returns the new codes [B, out, in]."""
    scale_t = res.per_column(res.scales.to(torch.float16).float())  # [B, in, out], as the loader reads it
    low_t = res.per_column(res.zeros.float()).neg_()  # the codes less the zero lie in [-zero, maxq - zero]
    high_t = low_t + maxq
    r_t = res.q.transpose(1, 2).float() + low_t  # the codes less the zero
    q_t = scale_t * r_t  # exact: an fp16 scale times an integer below 2^8
    grad_t = torch.bmm(hd, w.transpose(1, 2) - q_t)  # G^T = Hd (W - Q)^T, rows are columns of W
    diag = hd.diagonal(dim1=1, dim2=2).unsqueeze(-1)  # [B, in, 1]
    cols = r_t.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        dq = torch.zeros_like(q_t[:, i1:i2])
        with one_cpu_thread(w.device):  # nine kernels a column
            for j in range(i1, i2):
                target = q_t[:, j] + grad_t[:, j] / diag[:, j]
                r = torch.round(target / scale_t[:, j], out=r_t[:, j]).clamp_(low_t[:, j], high_t[:, j])
                step = torch.sub(scale_t[:, j] * r, q_t[:, j], out=dq[:, j - i1])  # exact, as q_t is
                q_t[:, j] += step
                grad_t[:, j + 1:i2].addcmul_(hd[:, j + 1:i2, j, None], step.unsqueeze(1), value=-1)
        grad_t[:, i2:].baddbmm_(hd[:, i2:, i1:i2], dq, alpha=-1)
    return (r_t - low_t).transpose(1, 2).to(torch.uint8).contiguous()


@contextmanager
def one_cpu_thread(device: torch.device):
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
