/* The codebook tables the 2-bit and 1-bit i-quants share (iq.h), built once per process, and the row functions'
 * dispatch between the encoders of iq1.c and iq2.c compiled for any x86-64 and for AVX2.
 */
#include <pthread.h>
#include <stdlib.h>

#include "common.h"
#include "iq.h"
#include "iq1_grids.h"
#include "iq2_grids.h"

/* The keys whose 2-bit fields are all at most 2, and squared distances between unpacked points. */
static int ternary_key(int i) {
    for (int k = 0; k < 8; ++k)
        if (((i >> 2 * k) & 3) == 3) return 0;
    return 1;
}

static int point_d2(const int8_t *p, int key) {
    int d2 = 0;
    for (int k = 0; k < 8; ++k) {
        const int d = p[k] - (2 * ((key >> 2 * k) & 3) + 1);
        d2 += d * d;
    }
    return d2;
}

/* The largest squared distance a neighbour list of `key` keeps: its nwant-th smallest distinct distance. */
static int list_limit(const int *d2, int ngrid, int nwant) {
    int seen[129] = {0};  /* distances between points with coordinates in {1, 3, 5} are at most 8 * 16 */
    for (int j = 0; j < ngrid; ++j) seen[d2[j]] = 1;
    int have = 0;
    for (int v = 0; v <= 128; ++v)
        if (seen[v] && ++have == nwant) return v;
    return 128;
}

/* Append key's list (count, then indices by distance, then index) to t->lists at *used. */
static void append_list(iq_table *t, const int *d2, int limit, int *used) {
    uint16_t *start = t->lists + (*used)++;
    int n = 0;
    for (int v = 0; v <= limit; ++v)
        for (int j = 0; j < t->ngrid; ++j)
            if (d2[j] == v) { t->lists[(*used)++] = (uint16_t)j; ++n; }
    *start = (uint16_t)n;
}

/* A codebook point's levels as iq_nearest reads them: 3 bits per position, the level plus 4 from position 4 on. */
static uint32_t spread_levels(uint16_t g) {
    uint32_t c = 0;
    for (int i = 0; i < 8; ++i) c |= (uint32_t)(((g >> 2 * i) & 3) | (i >= 4 ? 4 : 0)) << 3 * i;
    return c;
}

int mx_iq_build(iq_table *t, const uint16_t *grid, int ngrid, int nwant) {
    t->grid = grid;
    t->ngrid = ngrid;
    memset(t->on, 0, sizeof t->on);
    t->map = malloc(IQ_MAP_SIZE * sizeof(int32_t));
    t->points = malloc((size_t)ngrid * 8);
    int *d2 = malloc((size_t)ngrid * sizeof(int));
    size_t cap = 1 << 16;
    t->lists = malloc(cap * sizeof(uint16_t));
    if (!t->map || !t->points || !d2 || !t->lists) return -1;
    for (int i = 0; i < IQ_MAP_SIZE; ++i) t->map[i] = INT32_MIN;
    for (int j = 0; j < ngrid; ++j) {
        for (int k = 0; k < 8; ++k) t->points[8 * j + k] = (int8_t)(2 * ((grid[j] >> 2 * k) & 3) + 1);
        t->map[grid[j]] = j;
        t->on[grid[j] >> 5] |= 1u << (grid[j] & 31);
    }
    int used = 0;
    for (int key = 0; key < IQ_MAP_SIZE; ++key) {
        if (t->map[key] >= 0 || !ternary_key(key)) continue;
        for (int j = 0; j < ngrid; ++j) d2[j] = point_d2(t->points + 8 * j, key);
        if ((size_t)used + 1 + ngrid > cap) {
            cap *= 2;
            uint16_t *grown = realloc(t->lists, cap * sizeof(uint16_t));
            if (!grown) return -1;
            t->lists = grown;
        }
        t->map[key] = -(used + 1);
        append_list(t, d2, list_limit(d2, ngrid, nwant), &used);
        const int len = t->lists[-t->map[key] - 1];
        if (len > IQ_MAX_LIST) return -1;
    }
    free(d2);
    t->codes = malloc(((size_t)used + 8) * sizeof(uint32_t));
    if (!t->codes) return -1;
    for (int k = 0; k < used + 8; ++k) t->codes[k] = 0;
    for (int key = 0; key < IQ_MAP_SIZE; ++key) {
        if (t->map[key] >= 0 || !ternary_key(key)) continue;
        const int off = -t->map[key] - 1;
        for (int j = 1; j <= t->lists[off]; ++j) t->codes[off + j] = spread_levels(grid[t->lists[off + j]]);
    }
    return 0;
}

iq_table mx_iq_tables[IQT_COUNT];
static int table_error[IQT_COUNT];
static pthread_once_t once[IQT_COUNT] = {PTHREAD_ONCE_INIT, PTHREAD_ONCE_INIT, PTHREAD_ONCE_INIT, PTHREAD_ONCE_INIT};

/* nwant: IQ2_XXS and IQ2_XS keep two distances, IQ2_S one, the 1-bit codebook three (iq2xs_init_impl) */
static void init_xxs(void) { table_error[IQT_2XXS] = mx_iq_build(&mx_iq_tables[IQT_2XXS], iq2_grid_256, 256, 2); }
static void init_xs(void) { table_error[IQT_2XS] = mx_iq_build(&mx_iq_tables[IQT_2XS], iq2_grid_512, 512, 2); }
static void init_s(void) { table_error[IQT_2S] = mx_iq_build(&mx_iq_tables[IQT_2S], iq2_grid_1024, 1024, 1); }
static void init_1(void) { table_error[IQT_1] = mx_iq_build(&mx_iq_tables[IQT_1], iq1_grid_2048, 2048, 3); }

static int ready(int which, void (*init)(void)) {
    pthread_once(&once[which], init);
    return table_error[which] ? -3 : 0;
}

int mx_iq_prepare(int type, const float *qw) {
    switch (type) {
    case T_IQ2_XXS: return qw ? ready(IQT_2XXS, init_xxs) : -1;
    case T_IQ2_XS: return qw ? ready(IQT_2XS, init_xs) : -1;
    case T_IQ2_S: return ready(IQT_2S, init_s);
    case T_IQ1_S: return qw ? ready(IQT_1, init_1) : -1;
    case T_IQ1_M: return ready(IQT_1, init_1);
    default: return 0;
    }
}

/* Whether the AVX2 encoders may run: the CPU has AVX2 and the OS saves its registers (libgcc checks both). */
static int use_avx2(void) {
#ifdef MX_IQ_AVX2
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}

#ifdef MX_IQ_AVX2
#define DISPATCH(name)                                                                   \
    void name(const float *x, uint8_t *y, int64_t n, const float *qw) {                  \
        if (use_avx2()) name##_avx2(x, y, n, qw); else name##_base(x, y, n, qw);         \
    }
#else
#define DISPATCH(name)                                                                   \
    void name(const float *x, uint8_t *y, int64_t n, const float *qw) { (void)use_avx2; name##_base(x, y, n, qw); }
#endif

DISPATCH(mx_iq2_xxs_row)
DISPATCH(mx_iq2_xs_row)
DISPATCH(mx_iq2_s_row)
DISPATCH(mx_iq1_s_row)
DISPATCH(mx_iq1_m_row)
