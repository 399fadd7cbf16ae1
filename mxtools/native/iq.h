/* The 2-bit and 1-bit i-quants (IQ2_XXS, IQ2_XS, IQ2_S in iq2.c; IQ1_S, IQ1_M in iq1.c): codebook tables and row
 * encoders producing exactly the bytes of llama.cpp's ggml_quantize_chunk.
 *
 * Every encoder rounds a group of eight values to levels {0, 1, 2} (codebook values 1, 3, 5), packs the levels
 * into a 16-bit key (two bits per value) and looks the key up: a codebook point, or a list of the codebook points
 * nearest to it (all points at the `nwant` smallest distinct squared distances, ordered by distance, then index,
 * as ggml's iq2xs_init_impl orders them), among which the best weighted fit is chosen.
 */
#ifndef MX_IQ_H
#define MX_IQ_H

#include <stdint.h>

#define IQ_MAP_SIZE 43692  /* keys with every 2-bit field at most 2 are below 0xaaab */
#define IQ_MAX_LIST 512    /* longest neighbour list a table may hold (the longest, of IQ2_XS, has 292) */

typedef struct {
    const uint16_t *grid;  /* packed codebook, ngrid entries */
    int ngrid;
    int32_t *map;          /* key -> codebook index (>= 0), or -(offset + 1) of its neighbour list */
    uint16_t *lists;       /* neighbour lists: a count, then that many codebook indices */
    int8_t *points;        /* codebook points unpacked, 8 values 2 l + 1 per entry */
    float *tpoints;        /* each neighbour list's points as floats, position-major in chunks of 8 (see iq2.c) */
    int32_t *toffset;      /* key -> offset into tpoints (in chunks of 64 floats), -1 on the grid */
} iq_table;

/* Build a table (once per process; callers serialize with pthread_once). Returns 0, or -1 when out of memory. */
int mx_iq_build(iq_table *t, const uint16_t *grid, int ngrid, int nwant);

/* ggml type ids of these encoders */
enum { T_IQ2_XXS = 16, T_IQ2_XS = 17, T_IQ1_S = 19, T_IQ2_S = 22, T_IQ1_M = 29 };

/* Row encoders (x: n values, n a multiple of 256; qw: n importance weights or NULL where ggml allows it). */
void mx_iq2_xxs_row(const float *x, uint8_t *y, int64_t n, const float *qw);
void mx_iq2_xs_row(const float *x, uint8_t *y, int64_t n, const float *qw);
void mx_iq2_s_row(const float *x, uint8_t *y, int64_t n, const float *qw);
void mx_iq1_s_row(const float *x, uint8_t *y, int64_t n, const float *qw);
void mx_iq1_m_row(const float *x, uint8_t *y, int64_t n, const float *qw);

/* Before encoding `type`: builds its tables; 0 when ready, -1 when the type needs an importance matrix and qw is
 * NULL (ggml_quantize_requires_imatrix: IQ2_XXS, IQ2_XS, IQ1_S), -3 when out of memory. 0 for other types. */
int mx_iq_prepare(int type, const float *qw);
int mx_iq1_prepare(void);

#endif
