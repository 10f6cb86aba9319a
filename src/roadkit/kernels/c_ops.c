/* roadkit's CPU serving kernel: rotate each row of x by its own row of a coefficient table.

   Row t of x (n rows of d features) is rotated by table row r = index[t]: feature j of a group's first half
   and feature j + h of the same group (groups of 2h = half[r] * 2 features) give
       y[j]     = x[j]     + k[j]     * x[j]     + w[j]     * x[j + h]
       y[j + h] = x[j + h] + k[j + h] * x[j + h] + w[j + h] * x[j]
   with k = c - 1 and w the signed sines (-s on first halves, +s on second halves). Storing c - 1 rather than
   c keeps the adapter's small deviations from the identity exact to the coefficient type's precision, so
   bfloat16 tables (half the bytes to read per token) lose nothing a bfloat16 output keeps. Rows whose index
   is `identity` are copied. Math in float32, one rounding to x's dtype at the end. Tables: `rows` x d, of
   float32 or bfloat16 (the entry point's second suffix).
   Returns -1, or the first row t whose index is outside [0, rows) or whose half does not split d into
   whole groups (then no row is written).

   Compiled on first use by roadkit/kernels/c_ops.py with the machine's C compiler (-O3 -march=native,
   -fopenmp where available): AVX-512 machines take the explicit 16-wide loops below for halves that are
   multiples of 16; every other case is plain C that the compiler vectorises. */
#include <stdint.h>
#include <string.h>

static inline float bf16_load(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t bf16_store(float f) { /* round to nearest even; NaN stays NaN */
  uint32_t u;
  memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? 0x7fc0u : rounded);
}
static inline float f32_load(float v) { return v; }
static inline float f32_store(float f) { return f; }
#ifdef __FLT16_MAX__
#define HAVE_F16 1
static inline float f16_load(_Float16 v) { return (float)v; }
static inline _Float16 f16_store(float f) { return (_Float16)f; }
#endif

/* One row in plain C; H > 0 fixes the half-group size at compile time (short groups unroll). */
#define ROW(NAME, T, LOAD, STORE, C, CLOAD, H)                                                         \
  static void NAME(const T *__restrict x, T *__restrict y, const C *__restrict k, const C *__restrict w, \
                   int64_t h, int64_t d) {                                                             \
    const int64_t hh = (H) ? (H) : h;                                                                  \
    for (int64_t g = 0; g < d; g += 2 * hh) {                                                          \
      for (int64_t j = g; j < g + hh; j++) {                                                           \
        float a = LOAD(x[j]), b = LOAD(x[j + hh]);                                                     \
        y[j] = STORE(a + CLOAD(k[j]) * a + CLOAD(w[j]) * b);                                           \
        y[j + hh] = STORE(b + CLOAD(k[j + hh]) * b + CLOAD(w[j + hh]) * a);                            \
      }                                                                                                \
    }                                                                                                  \
  }

#if defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_VEC16 1
static inline __m512 vload_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore_f32(float *p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline __m512 vload_bf16(const uint16_t *p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline void vstore_bf16(uint16_t *p, __m512 v) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
#else
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(rounded));
#endif
}
#ifdef HAVE_F16
static inline __m512 vload_f16(const _Float16 *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline void vstore_f16(_Float16 *p, __m512 v) {
  _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif
/* One row, 16 features at a time: h must be a multiple of 16. */
#define ROW16(NAME, T, VLOAD, VSTORE, C, VCLOAD)                                                       \
  static void NAME(const T *__restrict x, T *__restrict y, const C *__restrict k, const C *__restrict w, \
                   int64_t h, int64_t d) {                                                             \
    for (int64_t g = 0; g < d; g += 2 * h) {                                                           \
      for (int64_t j = g; j < g + h; j += 16) {                                                        \
        __m512 a = VLOAD(x + j), b = VLOAD(x + j + h);                                                 \
        VSTORE(y + j, _mm512_fmadd_ps(VCLOAD(k + j), a, _mm512_fmadd_ps(VCLOAD(w + j), b, a)));        \
        VSTORE(y + j + h, _mm512_fmadd_ps(VCLOAD(k + j + h), b, _mm512_fmadd_ps(VCLOAD(w + j + h), a, b))); \
      }                                                                                                \
    }                                                                                                  \
  }
#endif

#ifdef HAVE_VEC16
#define WIDE(SUFFIX) if (h % 16 == 0) row16_##SUFFIX(xt, yt, kr, wr, h, d); else
#else
#define WIDE(SUFFIX)
#endif

/* The first row t whose index is outside [0, rows), or whose half-group size does not split d into whole
   groups; -1 when every row is fine. Checked before any row is written. */
static int64_t first_bad_row(const int32_t *half, const int64_t *index, int64_t rows, int64_t identity,
                             int64_t n, int64_t d) {
  for (int64_t t = 0; t < n; t++) {
    const int64_t r = index[t];
    if (r < 0 || r >= rows || (r != identity && (half[r] <= 0 || d % (2 * (int64_t)half[r])))) return t;
  }
  return -1;
}

/* Rows are split over the threads of the process's OpenMP runtime (torch's own: the library is linked
   against the libgomp torch has loaded) when there is enough work to pay for waking them. */
#ifdef _OPENMP
#define PARALLEL_ROWS _Pragma("omp parallel for schedule(static) if (work >= 65536)")
#else
#define PARALLEL_ROWS
#endif

/* The exported entry point for one activation dtype and one coefficient dtype: rotate_<SUFFIX>(x, x_stride,
   y, y_stride, k, w, rows, half, index, identity, n, d), strides in elements; the tables are contiguous. */
#define ROTATE(SUFFIX, T, LOAD, STORE, C, CLOAD)                                                       \
  ROW(row1_##SUFFIX, T, LOAD, STORE, C, CLOAD, 1)                                                      \
  ROW(row2_##SUFFIX, T, LOAD, STORE, C, CLOAD, 2)                                                      \
  ROW(row4_##SUFFIX, T, LOAD, STORE, C, CLOAD, 4)                                                      \
  ROW(row8_##SUFFIX, T, LOAD, STORE, C, CLOAD, 8)                                                      \
  ROW(rowh_##SUFFIX, T, LOAD, STORE, C, CLOAD, 0)                                                      \
  int64_t rotate_##SUFFIX(const T *x, int64_t x_stride, T *y, int64_t y_stride, const C *k, const C *w, \
                          int64_t rows, const int32_t *half, const int64_t *index, int64_t identity,   \
                          int64_t n, int64_t d) {                                                      \
    const int64_t bad = first_bad_row(half, index, rows, identity, n, d);                              \
    if (bad >= 0) return bad;                                                                          \
    const int64_t work = n * d; /* elements: the parallel loop's threshold */                          \
    (void)work;                                                                                        \
    PARALLEL_ROWS                                                                                      \
    for (int64_t t = 0; t < n; t++) {                                                                  \
      const T *xt = x + t * x_stride;                                                                  \
      T *yt = y + t * y_stride;                                                                        \
      const int64_t r = index[t];                                                                      \
      if (r == identity) {                                                                             \
        memcpy(yt, xt, (size_t)d * sizeof(T));                                                         \
        continue;                                                                                      \
      }                                                                                                \
      const C *kr = k + r * d, *wr = w + r * d;                                                        \
      const int64_t h = half[r];                                                                       \
      switch (h) {                                                                                     \
        case 1: row1_##SUFFIX(xt, yt, kr, wr, 1, d); break;                                            \
        case 2: row2_##SUFFIX(xt, yt, kr, wr, 2, d); break;                                            \
        case 4: row4_##SUFFIX(xt, yt, kr, wr, 4, d); break;                                            \
        case 8: row8_##SUFFIX(xt, yt, kr, wr, 8, d); break;                                            \
        default: WIDE(SUFFIX) rowh_##SUFFIX(xt, yt, kr, wr, h, d);                                     \
      }                                                                                                \
    }                                                                                                  \
    return -1;                                                                                         \
  }

#ifdef HAVE_VEC16
ROW16(row16_f32_f32, float, vload_f32, vstore_f32, float, vload_f32)
ROW16(row16_f32_bf16, float, vload_f32, vstore_f32, uint16_t, vload_bf16)
ROW16(row16_bf16_f32, uint16_t, vload_bf16, vstore_bf16, float, vload_f32)
ROW16(row16_bf16_bf16, uint16_t, vload_bf16, vstore_bf16, uint16_t, vload_bf16)
#ifdef HAVE_F16
ROW16(row16_f16_f32, _Float16, vload_f16, vstore_f16, float, vload_f32)
ROW16(row16_f16_bf16, _Float16, vload_f16, vstore_f16, uint16_t, vload_bf16)
#endif
#endif
ROTATE(f32_f32, float, f32_load, f32_store, float, f32_load)
ROTATE(f32_bf16, float, f32_load, f32_store, uint16_t, bf16_load)
ROTATE(bf16_f32, uint16_t, bf16_load, bf16_store, float, f32_load)
ROTATE(bf16_bf16, uint16_t, bf16_load, bf16_store, uint16_t, bf16_load)
#ifdef HAVE_F16
ROTATE(f16_f32, _Float16, f16_load, f16_store, float, f32_load)
ROTATE(f16_bf16, _Float16, f16_load, f16_store, uint16_t, bf16_load)
#endif
