/* One-core peak multiply-accumulate throughput of this CPU, for benchmark "% of peak" columns.
 * Each kernel runs independent accumulator chains so the result is throughput, not latency.
 * Built and run by tools/peak.py with -O2 -march=native. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

#define CHAINS 12

__attribute__((target("avx2,fma"))) static double fma256(long iters) {
  __m256 acc[CHAINS], a = _mm256_set1_ps(1.0001f), b = _mm256_set1_ps(0.9999f);
  for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_ps((float)i);
  double t0 = now();
  for (long n = 0; n < iters; n++)
#pragma GCC unroll 16
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_fmadd_ps(a, acc[i], b);
  double dt = now() - t0;
  float sink = 0; for (int i = 0; i < CHAINS; i++) sink += acc[i][0];
  if (sink == 12345.f) puts("");
  return (double)iters * CHAINS * 8 / dt;  /* one MAC per lane */
}

/* The int8 kernels keep 12 accumulators in named registers, with an empty asm barrier per
   iteration: written as an array, GCC -O2 spilled them to the stack and the loop measured
   store-forwarding latency (39 instead of ~75 GMAC/s for vpmaddwd on Zen 3). */
#define ACCS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define DECL(i) __m256i a##i = _mm256_set1_epi32(i);
#define SUM(i) s = _mm256_add_epi32(s, a##i);
#define KEEP                                                                              \
  __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5),    \
                   "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11))

__attribute__((target("avx2"))) static double madd256(long iters) {
  /* exact u8 x s8 on AVX2: operands widened to int16, vpmaddwd = 16 MACs per instruction;
     the accumulator feeds the multiply so the compiler cannot hoist it */
  __m256i b = _mm256_set1_epi16(-2), s = _mm256_setzero_si256();
  ACCS(DECL)
  double t0 = now();
  for (long n = 0; n < iters; n++) {
#define STEP(i) a##i = _mm256_add_epi32(a##i, _mm256_madd_epi16(a##i, b));
    ACCS(STEP)
#undef STEP
    KEEP;
  }
  double dt = now() - t0;
  ACCS(SUM)
  if (_mm256_extract_epi32(s, 0) == 12345) puts("");
  return (double)iters * 12 * 16 / dt;
}

__attribute__((target("avx2"))) static double maddubs256(long iters) {
  /* u8 x s8 where pairs of products fit int16 (e.g. 7-bit activations): vpmaddubsw (32 MACs,
     pairs in int16) then vpmaddwd with ones into int32, as the AVX2 pairwise kernels and
     fbgemm / oneDNN / ONNX Runtime do; the accumulator's bytes are the u8 operand */
  __m256i b = _mm256_set1_epi8(-2), ones = _mm256_set1_epi16(1), s = _mm256_setzero_si256();
  ACCS(DECL)
  double t0 = now();
  for (long n = 0; n < iters; n++) {
#define STEP(i) a##i = _mm256_add_epi32(a##i, _mm256_madd_epi16(_mm256_maddubs_epi16(a##i, b), ones));
    ACCS(STEP)
#undef STEP
    KEEP;
  }
  double dt = now() - t0;
  ACCS(SUM)
  if (_mm256_extract_epi32(s, 0) == 12345) puts("");
  return (double)iters * 12 * 32 / dt;
}

#ifdef __AVX512F__
__attribute__((target("avx512f"))) static double fma512(long iters) {
  __m512 acc[CHAINS], a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(0.9999f);
  for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
  double t0 = now();
  for (long n = 0; n < iters; n++)
#pragma GCC unroll 16
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_fmadd_ps(a, acc[i], b);
  double dt = now() - t0;
  float sink = 0; for (int i = 0; i < CHAINS; i++) sink += _mm512_reduce_add_ps(acc[i]);
  if (sink == 12345.f) puts("");
  return (double)iters * CHAINS * 16 / dt;
}
#endif

#ifdef __AVX512VNNI__
__attribute__((target("avx512f,avx512vnni"))) static double vnni512(long iters) {
  __m512i acc[CHAINS], a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
  for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_epi32(i);
  double t0 = now();
  for (long n = 0; n < iters; n++)
#pragma GCC unroll 16
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
  double dt = now() - t0;
  int sink = 0; for (int i = 0; i < CHAINS; i++) sink += _mm512_reduce_add_epi32(acc[i]);
  if (sink == 12345) puts("");
  return (double)iters * CHAINS * 64 / dt;  /* vpdpbusd: 64 u8 x s8 MACs */
}
#endif

#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
#ifdef __AVXVNNI__
#define DPBUSD256 _mm256_dpbusd_avx_epi32 /* VEX-encoded (AVX-VNNI) */
#else
#define DPBUSD256 _mm256_dpbusd_epi32
#endif
static double vnni256(long iters) {
  __m256i acc[CHAINS], a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-2);
  for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_epi32(i);
  double t0 = now();
  for (long n = 0; n < iters; n++)
#pragma GCC unroll 16
    for (int i = 0; i < CHAINS; i++) acc[i] = DPBUSD256(acc[i], a, b);
  double dt = now() - t0;
  int sink = 0; for (int i = 0; i < CHAINS; i++) sink += _mm256_extract_epi32(acc[i], 0);
  if (sink == 12345) puts("");
  return (double)iters * CHAINS * 32 / dt;  /* vpdpbusd ymm: 32 u8 x s8 MACs */
}
#endif

#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
/* AMX tdpbusd: 4 accumulator tiles (16 x 16 int32) fed by two u8 tiles and two s8 tiles
   (16 rows x 64 bytes), 16 x 16 x 64 MACs per instruction, operands loaded once (the
   instruction's own rate). Linux refuses tile data until the process asks for it. */
static double amx(long iters) {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) return -1;
  struct {
    uint8_t palette, start, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } __attribute__((aligned(64))) cfg = {0};
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  static int8_t a[16 * 64] __attribute__((aligned(64))), b[16 * 64] __attribute__((aligned(64)));
  static int32_t c[16 * 16] __attribute__((aligned(64)));
  for (int i = 0; i < 16 * 64; i++) { a[i] = (int8_t)(i % 7); b[i] = (int8_t)(i % 5 - 2); }
  _tile_loadconfig(&cfg);
  _tile_loadd(4, a, 64); _tile_loadd(5, a, 64); _tile_loadd(6, b, 64); _tile_loadd(7, b, 64);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  double t0 = now();
  for (long n = 0; n < iters; n++) {
    _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
  }
  double dt = now() - t0;
  _tile_stored(0, c, 64);
  _tile_release();
  if (c[0] == 12345) puts("");
  return (double)iters * 4 * 16 * 16 * 64 / dt;
}
#endif

int main(int argc, char **argv) {
  long iters = argc > 1 ? atol(argv[1]) : 50000000L;
  printf("{\"fp32_fma_avx2\": %.4g, \"int8_vpmaddwd_avx2\": %.4g", fma256(iters), madd256(iters));
  printf(", \"int8_vpmaddubsw_avx2\": %.4g", maddubs256(iters));
#ifdef __AVX512F__
  printf(", \"fp32_fma_avx512\": %.4g", fma512(iters));
#endif
#ifdef __AVX512VNNI__
  printf(", \"int8_vpdpbusd_avx512\": %.4g", vnni512(iters));
#endif
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
  printf(", \"int8_vpdpbusd_ymm\": %.4g", vnni256(iters));
#endif
#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
  double t = amx(iters / 20);
  if (t > 0) printf(", \"int8_tdpbusd_amx\": %.4g", t);
#endif
  printf("}\n");
  return 0;
}
