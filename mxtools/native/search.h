/* The scale searches of ggml-quants.c, run on NL = 8 sub-blocks at once ("lanes").
 *
 * A lane array holds 8 sub-blocks side by side: x[i][k] is value i of sub-block k, one 8-float vector per i.
 * Every per-block sum is still a plain left-to-right float loop over i (the order ggml uses), so results are
 * bit-identical, while each operation works on the 8 sub-blocks at once (GCC vector extensions: AVX on the
 * avx2 clones of the row functions, two SSE halves otherwise).
 */
#ifndef MX_SEARCH_H
#define MX_SEARCH_H

#include "common.h"

#define NL 8

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));

MX_INLINE vf splat(float v) { return (vf){v, v, v, v, v, v, v, v}; }
/* (through a float broadcast: GCC 12 builds the integer one lane by lane) */
MX_INLINE vi splati(int v) {
    float f;
    memcpy(&f, &v, sizeof f);
    return (vi)splat(f);
}
MX_INLINE vf pick(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
MX_INLINE vi picki(vi mask, vi a, vi b) { return (mask & a) | (~mask & b); }
MX_INLINE vf vabs(vf v) { return (vf)((vi)v & splati(0x7fffffff)); }

/* nearest_int on 8 lanes, clamped to [lo, hi] */
MX_INLINE vi vnearest(vf v, int lo, int hi) {
    vi i = ((vi)(v + splat(12582912.f)) & splati(0x007fffff)) - splati(0x00400000);
    i = picki(i < splati(lo), splati(lo), i);
    return picki(i > splati(hi), splati(hi), i);
}

MX_INLINE vf tof(vi v) { return __builtin_convertvector(v, vf); }

/* make_qkx2_quants / make_qkx3_quants (identical once weights are given): asymmetric levels 0..nmax, a scale
 * and a min found by a grid search over iscale with a weighted least-squares refit. Writes L (levels), scale
 * and the_min (= -min, as ggml returns it). */
MX_INLINE void qkx_lanes_ex(int n, int nmax, const vf *x, const vf *w, vi *L, vf *scale_out, vf *the_min,
                            float rmin, float rdelta, int nstep, int use_mad, vf *round_out) {
    vf mn = x[0], mx = x[0], sum_w = w[0], sum_x = w[0] * x[0];
    for (int i = 1; i < n; ++i) {
        mn = pick(x[i] < mn, x[i], mn);
        mx = pick(x[i] > mx, x[i], mx);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    mn = pick(mn > 0, splat(0), mn);
    const vf first_min = mn, fnmax = splat((float)nmax);
    vf iscale = fnmax / (mx - mn), scale = 1 / iscale, best = splat(0);
    vf keep_iscale = iscale, keep_min = mn;
    for (int i = 0; i < n; ++i) {
        const vf l = tof(vnearest(iscale * (x[i] - mn), 0, nmax));
        const vf diff = scale * l + mn - x[i];
        best += w[i] * (use_mad ? vabs(diff) : diff * diff);
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = splat(rmin + rdelta * is + nmax) / (mx - mn);
        vf sum_l = splat(0), sum_l2 = splat(0), sum_xl = splat(0), err = splat(0);
        for (int i = 0; i < n; ++i) {
            const vf l = tof(vnearest(iscale * (x[i] - mn), 0, nmax));
            const vf wl = w[i] * l;
            sum_l += wl;
            sum_l2 += wl * l;
            sum_xl += wl * x[i];
        }
        const vf D = sum_w * sum_l2 - sum_l * sum_l;
        const vf s = (sum_w * sum_xl - sum_x * sum_l) / D;
        const vf m = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        const vi clamp = m > 0;  /* a positive min is clamped to 0 and the scale refit */
        const vf ts = pick(clamp, sum_xl / sum_l2, s), tm = pick(clamp, splat(0), m);
        for (int i = 0; i < n; ++i) {
            const vf l = tof(vnearest(iscale * (x[i] - mn), 0, nmax));
            const vf diff = ts * l + tm - x[i];
            err += w[i] * (use_mad ? vabs(diff) : diff * diff);
        }
        const vi better = (D > 0) & (err < best);
        keep_iscale = pick(better, iscale, keep_iscale);
        keep_min = pick(better, mn, keep_min);
        best = pick(better, err, best);
        scale = pick(better, ts, scale);
        mn = pick(better, tm, mn);
    }
    const vi live = mx > first_min;  /* a flat sub-block gets levels 0, scale 0 */
    for (int i = 0; i < n; ++i) L[i] = live & vnearest(keep_iscale * (x[i] - keep_min), 0, nmax);
    *scale_out = pick(live, scale, splat(0));
    *the_min = -pick(live, mn, first_min);
    if (round_out) {  /* the final rounding: L = live ? nearest(iscale * (x - min)) : 0 */
        round_out[0] = keep_iscale;
        round_out[1] = keep_min;
        round_out[2] = pick(live, splat(1), splat(0));
    }
}

MX_INLINE void qkx_lanes(int n, int nmax, const vf *x, const vf *w, vi *L, vf *scale_out, vf *the_min,
                         float rmin, float rdelta, int nstep, int use_mad) {
    qkx_lanes_ex(n, nmax, x, w, L, scale_out, the_min, rmin, rdelta, nstep, use_mad, 0);
}

/* make_qx_quants with rmse_type 1: symmetric levels stored as l + nmax in [0, 2 nmax), weights w (x^2 when w
 * is NULL). Writes the fitted scale per lane. */
MX_INLINE void qx_lanes_ex(int n, int nmax, const vf *x, const vf *w_or_null, vi *L, vf *scale_out, vf *round_out) {
    vf amax = splat(0), mx = splat(0);
    for (int i = 0; i < n; ++i) {
        const vi bigger = vabs(x[i]) > amax;
        amax = pick(bigger, vabs(x[i]), amax);
        mx = pick(bigger, x[i], mx);
    }
    vf best_iscale = splat(0), scale = splat(0), best = splat(0);
    for (int is = -10; is <= 9; ++is) {
        if (is == 0) continue;
        const int first = is == -10;  /* -nmax/max, taken as is; then -(nmax + 0.1 is)/max when better */
        const vf iscale = first ? splat((float)-nmax) / mx : -splat(nmax + 0.1f * is) / mx;
        vf sumlx = splat(0), suml2 = splat(0);
        for (int i = 0; i < n; ++i) {
            const vf v = x[i], w = w_or_null ? w_or_null[i] : v * v;
            const vf l = tof(vnearest(iscale * v, -nmax, nmax - 1));
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        const vf fit = pick(suml2 != 0, sumlx / suml2, splat(0));
        const vi better = splati(-first) | ((suml2 > 0) & (sumlx * sumlx > best * suml2));
        best_iscale = pick(better, iscale, best_iscale);
        scale = pick(better, fit, scale);
        best = pick(better, fit * sumlx, best);
    }
    const vi live = amax >= GROUP_MAX_EPS;  /* an all-(near-)zero sub-block gets levels 0, scale 0 */
    for (int i = 0; i < n; ++i) L[i] = live & (vnearest(best_iscale * x[i], -nmax, nmax - 1) + splati(nmax));
    *scale_out = pick(live, scale, splat(0));
    if (round_out) {  /* the final rounding: L = live ? nearest(iscale * x) + nmax : 0 */
        round_out[0] = best_iscale;
        round_out[1] = splat(0);
        round_out[2] = pick(live, splat(1), splat(0));
    }
}

MX_INLINE void qx_lanes(int n, int nmax, const vf *x, const vf *w_or_null, vi *L, vf *scale_out) {
    qx_lanes_ex(n, nmax, x, w_or_null, L, scale_out, 0);
}

/* make_q3_quants with do_rmse: signed levels in [-nmax, nmax) refined one value at a time (weights x^2, up to five
 * sweeps; a lane whose sweep changes nothing stops, as ggml's per-block loop breaks). L gets l + nmax. */
MX_INLINE void q3_lanes(int n, int nmax, const vf *x, vi *L, vf *scale_out) {
    vf amax = splat(0), mx = splat(0), lv[32];
    for (int i = 0; i < n; ++i) {
        const vi bigger = vabs(x[i]) > amax;
        amax = pick(bigger, vabs(x[i]), amax);
        mx = pick(bigger, x[i], mx);
    }
    const vf iscale = splat((float)-nmax) / mx;
    vf sumlx = splat(0), suml2 = splat(0);
    for (int i = 0; i < n; ++i) {
        const vf w = x[i] * x[i];
        lv[i] = tof(vnearest(iscale * x[i], -nmax, nmax - 1));
        sumlx += w * x[i] * lv[i];
        suml2 += w * lv[i] * lv[i];
    }
    vi active = splati(-1);
    for (int itry = 0; itry < 5; ++itry) {
        vi changed = splati(0);
        for (int i = 0; i < n; ++i) {
            const vf w = x[i] * x[i];
            const vf slx = sumlx - w * x[i] * lv[i];
            const vf sl2 = suml2 - w * lv[i] * lv[i];
            const vf new_l = tof(vnearest(x[i] * sl2 / slx, -nmax, nmax - 1));
            const vf slx2 = slx + w * x[i] * new_l, sl22 = sl2 + w * new_l * new_l;
            const vi take = active & (slx > 0) & (new_l != lv[i]) & (sl22 > 0) &
                            (slx2 * slx2 * suml2 > sumlx * sumlx * sl22);
            lv[i] = pick(take, new_l, lv[i]);
            sumlx = pick(take, slx2, sumlx);
            suml2 = pick(take, sl22, suml2);
            changed |= take;
        }
        active &= changed;
        int any = 0;
        for (int k = 0; k < NL; ++k) any |= active[k];
        if (!any) break;
    }
    const vi live = amax >= GROUP_MAX_EPS;
    for (int i = 0; i < n; ++i) L[i] = live & (__builtin_convertvector(lv[i], vi) + splati(nmax));
    *scale_out = pick(live & (suml2 > 0), sumlx / suml2, splat(0));
}

/* Gather m <= NL consecutive sub-blocks of n values into lane layout (unused lanes are zero). */
MX_INLINE void to_lanes(int n, int m, const float *src, vf *dst) {
    for (int i = 0; i < n; ++i) dst[i] = splat(0);
    for (int k = 0; k < m; ++k)
        for (int i = 0; i < n; ++i) dst[i][k] = src[k * n + i];
}

#endif
