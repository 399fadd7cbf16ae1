/* Row quantizers of the 4-bit and 3-bit i-quants (iq4.c, iq3.c), byte for byte as ggml's quantize_iq4_nl,
 * quantize_iq4_xs, quantize_iq3_xxs and quantize_iq3_s; qw is the importance matrix row or NULL. */
#ifndef MX_IQ34_H
#define MX_IQ34_H

#include <stdint.h>

void mx_iq4_nl_row(const float *x, uint8_t *y, int64_t n, const float *qw);
void mx_iq4_xs_row(const float *x, uint8_t *y, int64_t n, const float *qw);
void mx_iq3_xxs_row(const float *x, uint8_t *y, int64_t n, const float *qw);
void mx_iq3_s_row(const float *x, uint8_t *y, int64_t n, const float *qw);

#endif
