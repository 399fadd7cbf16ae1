/* iq1.c compiled with AVX2 enabled for the whole file, vector types included (iq.h: the row functions choose
 * this build at run time where the CPU has AVX2). */
#if defined(__x86_64__) && !defined(MX_NO_CLONES)
#pragma GCC target("avx2")
#define MX_IQ_BUILD_AVX2
#include "iq1.c"
#endif
