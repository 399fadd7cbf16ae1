"""Float32 building blocks that reproduce llama.cpp's quantizer arithmetic bit for bit.

Everything works on "columns": a float32 array [n, N] holding N blocks (or sub-blocks) of n values, one
block per column, C-contiguous. llama.cpp sums block values in a plain left-to-right float loop;
`np.add.reduce(a, axis=0)` on such an array adds row after row into one accumulator, which is exactly that
order (torch and numpy's inner-axis sums use pairwise/cascade order and would differ in the last bit).
Expressions keep the C evaluation order: `w*x*l` is `(w*x)*l`, no fused multiply-add (ggml-base is built
for baseline x86-64, so the compiler cannot contract into FMA either).
Reference: ggml/src/ggml-quants.c (helpers nearest_int, make_qx_quants, make_qkx2/3_quants, make_qp_quants).
"""

import numpy as np

f32 = np.float32
GROUP_MAX_EPS = f32(1e-15)
_MAGIC = f32(12582912.0)  # 1.5 * 2**23, nearest_int's rounding constant


def columns(x: np.ndarray, n: int) -> np.ndarray:
    """Blocks of n consecutive values of x (any shape, C order) as the columns of an [n, N] array."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def assemble(nb: int, *fields: np.ndarray) -> np.ndarray:
    """Concatenate per-block fields ([nb, ...] arrays of any dtype, in block order) into [nb, bytes] uint8."""
    parts = [np.ascontiguousarray(f).view(np.uint8).reshape(nb, -1) for f in fields]
    return np.concatenate(parts, axis=1)


def seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in C loop order: ((a[0] + a[1]) + a[2]) + ..."""
    return np.add.reduce(a, axis=0)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int, including its wrap-around outside |v| <= 2**22 (returns int32)."""
    bits = (np.asarray(v, dtype=f32) + _MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def quant_levels(iscale: np.ndarray, x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """clip(nearest_int(iscale * x), lo, hi) as float32; iscale [N] scales the columns of x [n, N].

    Callers pass products bounded by about nmax + 1, where nearest_int equals round-half-to-even (its
    magic constant is even), which np.rint does in one pass. A non-finite iscale (tiny blocks) takes
    the exact bit trick, whose NaN/inf results differ from rint.
    """
    v = iscale * x
    if not np.isfinite(iscale).all():
        return np.clip(nearest_int(v), lo, hi).astype(f32)
    v = np.rint(v, out=v)
    return np.clip(v, lo, hi, out=v)


def fp16_bits(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even, subnormals kept) as uint16."""
    return np.asarray(v, dtype=f32).astype(np.float16).view(np.uint16)


def fp16_round(v: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)): the value a stored half really holds."""
    return np.asarray(v, dtype=f32).astype(np.float16).astype(f32)


def first_absmax(x: np.ndarray) -> np.ndarray:
    """Per column, the signed value of the first element with the largest |x| (C's `if (ax > amax)`)."""
    idx = np.argmax(np.abs(x), axis=0)
    return np.take_along_axis(x, idx[None, :], axis=0)[0]


def _levels_into(out: np.ndarray, iscale: np.ndarray, x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """quant_levels written into a preallocated buffer (the search loops reuse their buffers)."""
    if not np.isfinite(iscale).all():
        out[...] = quant_levels(iscale, x, lo, hi)
        return out
    np.multiply(iscale, x, out=out)
    np.rint(out, out=out)
    return np.clip(out, lo, hi, out=out)


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None = None):
    """make_qx_quants with rmse_type 1: symmetric levels in [0, 2*nmax) and the fitted scale.

    x, qw: [n, N]; weights are qw or x*x. Returns (L int32 [n, N], scale float32 [N]).
    The 19 candidate iscales do not depend on each other, so their sums are computed first and the
    C's sequential "keep if better" scan runs on per-block scalars; L is rebuilt for the winner.
    """
    mx = first_absmax(x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscales = [f32(-nmax) / mx] + [-(f32(nmax) + f32(0.1) * f32(s)) / mx for s in (*range(-9, 0), *range(1, 10))]
        sums = _qx_sums(x, x * x if qw is None else qw, iscales, nmax)
        sumlx, suml2 = sums[0]
        chosen = iscales[0]
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        for iscale, (sumlx, suml2) in zip(iscales[1:], sums[1:]):
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            chosen = np.where(better, iscale, chosen)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
        levels = quant_levels(chosen, x, -nmax, nmax - 1).astype(np.int32) + nmax
    zero = np.abs(mx) < GROUP_MAX_EPS
    levels[:, zero] = 0
    return levels, np.where(zero, f32(0), scale)


def _qx_sums(x, w, iscales, nmax):
    """(sum w*x*l, sum w*l*l) for the levels of each candidate iscale."""
    wx, wl, l = w * x, np.empty_like(x), np.empty_like(x)
    sums = []
    for iscale in iscales:
        _levels_into(l, iscale, x, -nmax, nmax - 1)
        np.multiply(w, l, out=wl)
        wl *= l
        suml2 = seqsum(wl)
        sums.append((seqsum(np.multiply(wx, l, out=wl)), suml2))
    return sums


def _weighted_sqerr(w, scale, levels, the_min, x, tmp=None, use_mad=False):
    """sum_i w * (scale*L + min - x)**2 in C order (|...| instead of the square with use_mad)."""
    diff = np.multiply(scale, levels, out=tmp)
    diff += the_min
    diff -= x
    if use_mad:
        np.abs(diff, out=diff)
    else:
        diff *= diff
    diff *= w
    return seqsum(diff)


def make_qkx_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool = False):
    """make_qkx2_quants / make_qkx3_quants (identical once weights are given).

    Asymmetric levels in [0, nmax] with a scale and a min, found by a grid search over iscale with a
    weighted least-squares refit. x, w: [n, N]. Returns (L float32 [n, N], scale [N], the_min [N]).
    """
    mx = x.max(axis=0)
    mn = np.minimum(x.min(axis=0), f32(0))
    flat = mx == mn
    st = _QkxState(x, w, mn, mx, use_mad)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        st.first(nmax)
        for step in range(nstep + 1):
            st.try_levels(f32(rmin) + f32(rdelta) * f32(step) + f32(nmax), nmax)
        best_l = quant_levels(st.l_iscale, x - st.l_min, 0, nmax)
    best_l[:, flat] = 0
    return best_l, np.where(flat, f32(0), st.scale), -st.mn


class _QkxState:
    """Per-block search state of make_qkx*_quants plus reusable [n, N] work buffers.

    The best levels are not stored: (l_iscale, l_min), the iscale and min they were computed from,
    rebuild them exactly at the end, which is cheaper than copying the winners' columns each step.
    """

    def __init__(self, x, w, mn, mx, use_mad):
        self.x, self.w, self.mn, self.mx, self.use_mad = x, w, mn, mx, use_mad
        self.sum_w, self.sum_x = seqsum(w), seqsum(w * x)
        self.xm, self.l, self.wl, self.tmp = (np.empty_like(x) for _ in range(4))

    def first(self, nmax):
        """The starting point: iscale = nmax / (max - min), scale = 1 / iscale."""
        iscale = f32(nmax) / (self.mx - self.mn)
        self.scale = f32(1) / iscale
        _levels_into(self.l, iscale, np.subtract(self.x, self.mn, out=self.xm), 0, nmax)
        self.best = _weighted_sqerr(self.w, self.scale, self.l, self.mn, self.x, self.tmp, self.use_mad)
        self.l_iscale, self.l_min = iscale, self.mn.copy()

    def try_levels(self, num, nmax):
        """One grid point: levels for iscale = num / (max - min), least-squares scale/min, kept if better."""
        x, w, l, wl, tmp = self.x, self.w, self.l, self.wl, self.tmp
        iscale = num / (self.mx - self.mn)
        _levels_into(l, iscale, np.subtract(x, self.mn, out=self.xm), 0, nmax)
        sum_l = seqsum(np.multiply(w, l, out=wl))
        sum_l2 = seqsum(np.multiply(wl, l, out=tmp))
        sum_xl = seqsum(np.multiply(wl, x, out=tmp))
        det = self.sum_w * sum_l2 - sum_l * sum_l
        this_scale = (self.sum_w * sum_xl - self.sum_x * sum_l) / det
        this_min = (sum_l2 * self.sum_x - sum_l * sum_xl) / det
        clamp = this_min > 0
        this_min[clamp] = 0
        this_scale[clamp] = (sum_xl / sum_l2)[clamp]
        err = _weighted_sqerr(w, this_scale, l, this_min, x, tmp, self.use_mad)
        better = (det > 0) & (err < self.best)
        if better.any():
            self.l_iscale = np.where(better, iscale, self.l_iscale)
            self.l_min = np.where(better, self.mn, self.l_min)
            self.scale = np.where(better, this_scale, self.scale)
            self.mn = np.where(better, this_min, self.mn)
            self.best = np.where(better, err, self.best)


def make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray):
    """make_qp_quants: levels in [0, nmax] for non-negative x (super-block scales), weighted by w.

    x, w: [n, N]. Returns (L as uint8 values in int32 [n, N], scale float32 [N]).
    """
    mx = np.maximum(x.max(axis=0), f32(0))
    zero = mx < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _qp_best_iscale(x, nmax, w, mx)
        l = np.minimum(nmax, nearest_int(iscale * x))
        lf = l.astype(f32)
        sumlx, suml2 = seqsum(w * x * lf), seqsum(w * lf * lf)
        levels = l & 0xFF  # stored in uint8 L[]
        sumlx, suml2 = _qp_refine(x, nmax, w, levels, sumlx, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, f32(0))
    levels[:, zero] = 0
    return levels, np.where(zero, f32(0), scale)


def _qp_best_iscale(x, nmax, w, mx):
    """The first phase of make_qp_quants: pick the iscale of lowest weighted error among 9 candidates."""
    iscale = f32(nmax) / mx
    levels = (nearest_int(iscale * x) & 0xFF).astype(f32)
    diff = x - (f32(1) / iscale) * levels
    best = seqsum(w * diff * diff)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = (f32(0.1) * f32(step) + f32(nmax)) / mx
        l = np.minimum(nmax, nearest_int(iscale_is * x)).astype(f32)
        diff = x - (f32(1) / iscale_is) * l
        mse = seqsum(w * diff * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, iscale_is, iscale)
    return iscale


def _qp_refine(x, nmax, w, levels, sumlx, suml2):
    """make_qp_quants' coordinate descent: up to 5 sweeps, changing one level at a time (in place)."""
    for _ in range(5):
        changed = False
        for i in range(x.shape[0]):
            wi, xi, li = w[i], x[i], levels[i].astype(f32)
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new_l = np.minimum(nmax, nearest_int(xi * sl2 / slx))
            take = (slx > 0) & (sl2 > 0) & (new_l != levels[i])
            newf = new_l.astype(f32)
            slx = slx + wi * xi * newf
            sl2 = sl2 + wi * newf * newf
            take &= slx * slx * suml2 > sumlx * sumlx * sl2
            if take.any():
                changed = True
                levels[i] = np.where(take, new_l & 0xFF, levels[i])
                sumlx, suml2 = np.where(take, slx, sumlx), np.where(take, sl2, suml2)
        if not changed:  # a sweep without change leaves every block where it is
            break
    return sumlx, suml2


def make_q3_quants(x: np.ndarray, nmax: int):
    """make_q3_quants with do_rmse: signed levels refined one at a time, weights x^2.

    x: [n, N]. Returns (L int32 [n, N] in [0, 2*nmax), scale float32 [N]).
    """
    mx = first_absmax(x)
    w = x * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        levels = np.clip(nearest_int((f32(-nmax) / mx) * x), -nmax, nmax - 1)
        lf = levels.astype(f32)
        sumlx, suml2 = seqsum(w * x * lf), seqsum(w * lf * lf)
        for _ in range(5):
            sumlx, suml2, changed = _q3_sweep(x, w, nmax, levels, sumlx, suml2)
            if not changed:
                break
        scale = np.where(suml2 > 0, sumlx / suml2, f32(0))
    zero = np.abs(mx) < GROUP_MAX_EPS
    levels += nmax
    levels[:, zero] = 0
    return levels, np.where(zero, f32(0), scale)


def _q3_sweep(x, w, nmax, levels, sumlx, suml2):
    """One pass of make_q3_quants' coordinate descent over the n positions (levels updated in place)."""
    changed = False
    for i in range(x.shape[0]):
        wi, xi, li = w[i], x[i], levels[i].astype(f32)
        slx = sumlx - wi * xi * li
        sl2 = suml2 - wi * li * li
        new_l = np.clip(nearest_int(xi * sl2 / slx), -nmax, nmax - 1)
        take = (slx > 0) & (new_l != levels[i])
        newf = new_l.astype(f32)
        slx = slx + wi * xi * newf
        sl2 = sl2 + wi * newf * newf
        take &= (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
        if take.any():
            changed = True
            levels[i] = np.where(take, new_l, levels[i])
            sumlx, suml2 = np.where(take, slx, sumlx), np.where(take, sl2, suml2)
    return sumlx, suml2, changed
