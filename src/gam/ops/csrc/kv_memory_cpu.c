/* The kv-slot memory's recurrence, fused, for CPUs: forward and backward.
 *
 * Per row (a batch row and head), token by token, with the slots held in fp32
 * and transposed, (d, S): every inner loop runs over the S slots in vectors of
 * 16 (S a multiple of 16, at most 128), whatever the head width d, and the
 * per-slot quantities of a token (gates, scores, their gradients) stay in
 * registers: the kernels are written for a compile-time number of blocks NB and
 * instantiated for each. At token t, with the bounded gate
 * g_t = clamp(log alpha_t, gate_min, 0), alpha_t = exp(g_t) and
 * w_t = 1 - alpha_t (per slot, computed here from log alpha):
 *
 *     K_t = alpha_t K_{t-1} + w_t k_t^T,   V_t likewise      (the write)
 *     p_t = softmax(K_t q_t),   o_t = V_t^T p_t                 (the read)
 *
 * Options (the layer's read, fused): the gate operand may hold the forget logits z instead
 * of log alpha (log alpha = logsigmoid(z): alpha = sigmoid(z), w = sigmoid(-z), computed
 * without a log; the bound on log alpha is then a bound on z); q is read scaled; and the
 * reads may leave RMS-normalized per token, times a weight (nn.RMSNorm of each head's read).
 *
 * The state never leaves the cache (d x S x 4 bytes per matrix: 6 KiB at d = 24,
 * 32 KiB at d = 128), where the chunked PyTorch form makes a few dozen passes
 * over (T, S) tensors in memory. The forward keeps the state every `span`
 * tokens and the softmax p_t; the backward runs two passes forward from each
 * span's checkpoint for what the reads' gradients need of the states (updated in
 * place, none stored per token), then the recurrence in reverse, carrying the
 * gradient of the state, and takes the gate's gradient from a running sum
 * (backward_row has the identity; gam/ops/kv_memory.py, kv_memory_fused, the maths).
 *
 * q, k, v, the reads and their gradients are fp32 or bf16 (`bf16` flag), with
 * strides: element (r, t, j) of a tensor with strides (sb, sh, st) and `heads`
 * H sits at (r / H) sb + (r % H) sh + t st + j; the gates and their gradient are
 * fp32 or bf16 (`gate_bf16`) with strides likewise; the initial key and value
 * slots are fp32 (S, d) per row with strides likewise (slot s in place of token t:
 * a bank shared by the batch has sb = 0). The final slots and the gradients of the
 * initial ones are (rows, S, d); everything else is fp32 and contiguous. Rows run
 * in parallel (OpenMP); the arithmetic is fp32 throughout.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
/* Denormals flushed to zero (FTZ) and read as zero (DAZ) inside the kernels: a carried gradient
   of a slot that its reads hardly touch decays by alpha every token into the denormal range,
   where x86 arithmetic is many times slower (a test variant with its recomputed states left at
   zero: backward 108 ms without the flush, 19 with it, paper shape, 1 thread); results change
   only below 1e-38. Restored on the way out. */
#define FLUSH_DENORMALS unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040);
#define RESTORE_DENORMALS _mm_setcsr(saved_csr);
#else
#define FLUSH_DENORMALS
#define RESTORE_DENORMALS
#endif

typedef struct {
    int64_t sb, sh, st;
} Strides;

typedef struct {
    int gate_logits;          /* the gate operand holds forget logits z (log alpha = logsigmoid(z)), else log alpha */
    int gate_bf16;            /* the gate operand and its gradient are bf16, else fp32 */
    float gate_min;           /* the bound: the lowest log alpha, or the lowest logit (the same alpha) */
    float q_scale;            /* q is read as q_scale * q */
    const float *norm_weight; /* not NULL: each token's read is RMS-normalized and scaled by it (d) */
    float norm_eps;
} Options;

static inline int64_t offset(const Strides *s, int64_t heads, int64_t r, int64_t t) {
    return (r / heads) * s->sb + (r % heads) * s->sh + t * s->st;
}

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? (bits >> 16) | 0x40 : rounded); /* NaN stays NaN */
}


typedef float v16 __attribute__((vector_size(64), aligned(4))); /* 16 lanes; unaligned loads allowed */
#define LOAD(p) (*(const v16 *)(p))
#define STORE(p, x) (*(v16 *)(p) = (x))
#define MAX_BLOCKS 8

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

/* The sum of the lanes as a tree (a loop over lanes is a chain of 15 dependent adds) */
static inline float hsum(v16 x) {
    v8 h = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 f = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (f[0] + f[2]) + (f[1] + f[3]);
}

typedef int32_t i16 __attribute__((vector_size(64)));

/* Lane-wise mask ? a : b, for masks from vector comparisons (C has no vector ?:) */
static inline v16 select(i16 mask, v16 a, v16 b) { return (v16)((mask & (i16)a) | (~mask & (i16)b)); }
static inline v16 vmax(v16 a, v16 b) { return select(a > b, a, b); }

static inline float hmax(v16 x) {
    v8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7), b = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    typedef int32_t i8 __attribute__((vector_size(32)));
    i8 m = a > b;
    a = (v8)((m & (i8)a) | (~m & (i8)b));
    const float x0 = a[0] > a[4] ? a[0] : a[4], x1 = a[1] > a[5] ? a[1] : a[5];
    const float x2 = a[2] > a[6] ? a[2] : a[6], x3 = a[3] > a[7] ? a[3] : a[7];
    const float y0 = x0 > x2 ? x0 : x2, y1 = x1 > x3 ? x1 : x3;
    return y0 > y1 ? y0 : y1;
}

/* exp(x) for x <= 0, to about 2 ulp: 2^n e^r with n = round(x / ln 2), |r| <= ln2 / 2, a
   degree-7 polynomial for e^r; on whole vectors (libm's expf is a call per element) */
static inline v16 exp_nonpositive(v16 x) {
    const v16 zero = x * 0.0f;
    x = vmax(x, zero - 87.0f);
    const v16 shifter = zero + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const v16 n = (x * 1.44269504088896341f + shifter) - shifter;
    const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f; /* ln 2 in two parts */
    const v16 p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f + r * (4.16666679e-2f
                  + r * (8.33333377e-3f + r * (1.38888892e-3f + r * 1.98412701e-4f))))));
    return p * (v16)((__builtin_convertvector(n, i16) + 127) << 23);
}

/* The bounded gate of 16 slots: alpha = exp(g) and w = 1 - alpha, g = clamp(log alpha, lowest, 0);
   w from a series where |g| < 1/2 (1 - exp(g) would lose its leading digits as g -> 0) */
static inline void gates(v16 log_alpha, float lowest, v16 *alpha, v16 *w) {
    const v16 zero = log_alpha * 0.0f;
    const v16 g = vmax(select(log_alpha > zero, zero, log_alpha), zero + lowest);
    *alpha = exp_nonpositive(g);
    const v16 series = -g * (1.0f + g * (1.0f / 2 + g * (1.0f / 6 + g * (1.0f / 24 + g * (1.0f / 120 + g * (1.0f / 720
                       + g * (1.0f / 5040 + g * (1.0f / 40320))))))));
    *w = select(g > zero - 0.5f, series, 1.0f - *alpha);
}

/* The same from forget logits z (log alpha = logsigmoid(z)), z bounded below by `lowest`: with
   u = exp(-|z|), alpha = sigmoid(z) and w = sigmoid(-z) are 1 / (1 + u) and u / (1 + u), one way round
   or the other, each to full precision (no 1 - alpha) */
static inline void logit_gates(v16 z, float lowest, v16 *alpha, v16 *w) {
    const v16 zero = z * 0.0f;
    z = vmax(z, zero + lowest);
    const v16 u = exp_nonpositive(select(z > zero, -z, z)), inv = 1.0f / (1.0f + u);
    *alpha = select(z > zero, inv, u * inv);
    *w = select(z > zero, u * inv, inv);
}

typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));

/* 16 lanes at element `at` of an fp32 or bf16 array */
static inline v16 load16(const void *base, int bf16, int64_t at) {
    if (!bf16) return LOAD((const float *)base + at);
    return (v16)(__builtin_convertvector(*(const u16x16 *)((const uint16_t *)base + at), i16) << 16);
}

typedef uint32_t u32x16 __attribute__((vector_size(64)));

/* 16 lanes rounded to bf16 as float_to_bf16 */
static inline u16x16 bf16_lanes(v16 x) {
    const u32x16 bits = (u32x16)x, nan = (u32x16)((bits & 0x7fffffffu) > 0x7f800000u);
    const u32x16 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return __builtin_convertvector((nan & ((bits >> 16) | 0x40u)) | (~nan & rounded), u16x16);
}

static inline void store16(void *base, int bf16, int64_t at, v16 x) {
    if (!bf16)
        STORE((float *)base + at, x);
    else
        *(u16x16 *)((uint16_t *)base + at) = bf16_lanes(x);
}

/* n elements at `at` of an fp32 or bf16 array, times `scale`, into fp32 `out`; and `scale` times
   fp32 x back: 16 lanes at a time, the last n % 16 under a mask where AVX-512 has one (a head
   width of 24 leaves 8: element by element, their stores stalled the vector loads that read them
   back, a store-forwarding miss per row) */
#if defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512F__)
#include <immintrin.h>
#define MASKED_TAILS 1
#endif

static void load(const void *base, int bf16, int64_t at, int64_t n, float scale, float *out) {
    int64_t j = 0;
    if (!bf16) {
        if (scale == 1.0f) {
            memcpy(out, (const float *)base + at, n * sizeof(float));
            return;
        }
        for (; j + 16 <= n; j += 16) STORE(out + j, LOAD((const float *)base + at + j) * scale);
        for (; j < n; j++) out[j] = ((const float *)base)[at + j] * scale;
        return;
    }
    for (; j + 16 <= n; j += 16) STORE(out + j, load16(base, 1, at + j) * scale);
#ifdef MASKED_TAILS
    if (j < n) {
        const __mmask16 m = (__mmask16)((1u << (n - j)) - 1);
        const __m512i x = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)base + at + j)), 16);
        _mm512_mask_storeu_ps(out + j, m, (__m512)((v16)_mm512_castsi512_ps(x) * scale));
    }
#else
    for (; j < n; j++) out[j] = bf16_to_float(((const uint16_t *)base)[at + j]) * scale;
#endif
}

static void store(void *base, int bf16, int64_t at, int64_t n, float scale, const float *x) {
    int64_t j = 0;
    if (!bf16) {
        if (scale == 1.0f) {
            memcpy((float *)base + at, x, n * sizeof(float));
            return;
        }
        for (; j + 16 <= n; j += 16) STORE((float *)base + at + j, LOAD(x + j) * scale);
        for (; j < n; j++) ((float *)base)[at + j] = x[j] * scale;
        return;
    }
    for (; j + 16 <= n; j += 16) store16(base, 1, at + j, LOAD(x + j) * scale);
#ifdef MASKED_TAILS
    if (j < n) {
        const __mmask16 m = (__mmask16)((1u << (n - j)) - 1);
        const v16 y = (v16)_mm512_maskz_loadu_ps(m, x + j) * scale;
        _mm256_mask_storeu_epi16((uint16_t *)base + at + j, m, (__m256i)bf16_lanes(y));
    }
#else
    for (; j < n; j++) ((uint16_t *)base)[at + j] = float_to_bf16(x[j] * scale);
#endif
}

/* p = softmax(z) over NB blocks, in place */
static inline __attribute__((always_inline)) void softmax(const int NB, v16 *z) {
    v16 m = z[0];
    for (int b = 1; b < NB; b++) m = vmax(m, z[b]);
    const float top = hmax(m);
    v16 sum = z[0] * 0.0f;
    for (int b = 0; b < NB; b++) {
        z[b] = exp_nonpositive(z[b] - top);
        sum += z[b];
    }
    const float inv = 1.0f / hsum(sum);
    for (int b = 0; b < NB; b++) z[b] *= inv;
}

/* The softmax of n rows of S = 16 NB scores (rows `ld` apart) into dst (rows S apart), and into
   `kept` likewise where it is not NULL; src may be dst */
static inline __attribute__((always_inline)) void softmax_rows(const int NB, const float *src, int64_t ld, int64_t n,
                                                               float *dst, float *kept) {
    const int64_t S = NB * 16;
    for (int64_t i = 0; i < n; i++) {
        v16 z[MAX_BLOCKS];
        for (int b = 0; b < NB; b++) z[b] = LOAD(src + i * ld + b * 16);
        softmax(NB, z);
        for (int b = 0; b < NB; b++) {
            STORE(dst + i * S + b * 16, z[b]);
            if (kept) STORE(kept + i * S + b * 16, z[b]);
        }
    }
}

/* Per span of tokens, the state is swept in groups of `rows_per_group` rows j (a slice of the
   (d, S) matrix, contiguous): a group's slice stays in the L1 cache while the span's tokens pass
   over it, and the per-token sums over j (the scores, their gradients) are accumulated group by
   group in small per-span buffers. The span's gates, inputs and those buffers are fp32 arrays of
   (n, S) or (n, d) in a per-thread workspace. */
typedef struct {
    float *a, *w, *z, *dalpha; /* (span, S) */
    float *scores, *f;         /* (span, S): the backward's recomputed scores, and what each token's read adds to Z */
    float *q, *k, *v, *o;      /* (span, d): inputs, and the reads or the read's gradient */
    float *dq, *dk, *dv;       /* (span, d) */
    float *K, *V;              /* (d, S): the state, or its gradient */
    float *Ks, *Vs;            /* (d, S): the backward's recomputed state */
} Workspace;

static Workspace workspace(float *buf, int64_t span, int64_t d, int64_t S) {
    Workspace ws;
    ws.a = buf; ws.w = ws.a + span * S; ws.z = ws.w + span * S; ws.dalpha = ws.z + span * S;
    ws.scores = ws.dalpha + span * S; ws.f = ws.scores + span * S;
    ws.q = ws.f + span * S; ws.k = ws.q + span * d; ws.v = ws.k + span * d; ws.o = ws.v + span * d;
    ws.dq = ws.o + span * d; ws.dk = ws.dq + span * d; ws.dv = ws.dk + span * d;
    ws.K = ws.dv + span * d; ws.V = ws.K + d * S; ws.Ks = ws.V + d * S; ws.Vs = ws.Ks + d * S;
    return ws;
}

static int64_t workspace_floats(int64_t span, int64_t d, int64_t S) {
    return 6 * span * S + 7 * span * d + 4 * d * S + 16;
}

/* Asks the cache for token t of row r of an operand (`width` elements, fp32 or bf16; NULL, or t
   outside 0 .. T - 1: nothing), for reading or (`write`) writing. The rows of a (B, T, H, X) tensor
   are strided, so the hardware's prefetcher does not see them coming: the passes that read or write
   a span's tokens ask for the next span's, token by token (a burst of a span's requests at once
   overflows the cache's queue and most are dropped) */
static inline void prefetch_token(const void *base, int bf16, const Strides *s, int64_t heads, int64_t r, int64_t t,
                                  int64_t T, int64_t width, int write) {
    if (!base || t < 0 || t >= T) return;
    const int64_t bytes = width * (bf16 ? 2 : 4);
    const char *row = (const char *)base + offset(s, heads, r, t) * (bf16 ? 2 : 4);
    for (int64_t at = 0; at < bytes; at += 64) {
        if (write)
            __builtin_prefetch(row + at, 1, 3);
        else
            __builtin_prefetch(row + at, 0, 3);
    }
}

/* The span's gates, and with `inputs` its inputs (q, k, v: any of them NULL to skip) as fp32 rows; those
   of the token `ahead` tokens on asked for (0: none) */
static inline __attribute__((always_inline)) void load_span(
        const int NB, const Workspace *ws, int64_t r, int64_t t0, int64_t n, int64_t heads, int64_t T, int64_t d,
        int bf16, const void *gate, const Strides *sg, const Options *opt, const void *q, const Strides *sq,
        const void *k, const Strides *sk, const void *v, const Strides *sv, int inputs, int64_t ahead) {
    const int64_t S = NB * 16;
    for (int64_t i = 0; i < n; i++) {
        if (ahead) {
            const int64_t t = t0 + i + ahead;
            prefetch_token(gate, opt->gate_bf16, sg, heads, r, t, T, S, 0);
            prefetch_token(q, bf16, sq, heads, r, t, T, d, 0);
            prefetch_token(k, bf16, sk, heads, r, t, T, d, 0);
            prefetch_token(v, bf16, sv, heads, r, t, T, d, 0);
        }
        for (int b = 0; b < NB; b++) {
            v16 a, w;
            const v16 g = load16(gate, opt->gate_bf16, offset(sg, heads, r, t0 + i) + b * 16);
            if (opt->gate_logits)
                logit_gates(g, opt->gate_min, &a, &w);
            else
                gates(g, opt->gate_min, &a, &w);
            STORE(ws->a + i * S + b * 16, a);
            STORE(ws->w + i * S + b * 16, w);
        }
        if (!inputs) continue;
        if (q) load(q, bf16, offset(sq, heads, r, t0 + i), d, opt->q_scale, ws->q + i * d);
        if (k) load(k, bf16, offset(sk, heads, r, t0 + i), d, 1.0f, ws->k + i * d);
        if (v) load(v, bf16, offset(sv, heads, r, t0 + i), d, 1.0f, ws->v + i * d);
    }
}

/* x[b] = the b-th 16 slots of src, b < NB */
static inline __attribute__((always_inline)) void load_slots(const int NB, const float *src, v16 *x) {
    for (int b = 0; b < NB; b++) x[b] = LOAD(src + b * 16);
}

/* M (d, S), the kernel's layout, from slots (S, d) at src, `slot_stride` apart */
static void slots_to_state(const float *src, int64_t slot_stride, int64_t S, int64_t d, float *M) {
    for (int64_t s = 0; s < S; s++)
        for (int64_t j = 0; j < d; j++) M[j * S + s] = src[s * slot_stride + j];
}

/* slots (S, d), contiguous, from M (d, S) */
static void state_to_slots(const float *M, int64_t S, int64_t d, float *dst) {
    for (int64_t s = 0; s < S; s++)
        for (int64_t j = 0; j < d; j++) dst[s * d + j] = M[j * S + s];
}

/* The forward's two sweeps over a group's rows j0 .. j1 - 1, for TOKENS (1 or 2) tokens from the
   span's i-th at a time: each row is loaded and stored once for them (the state's traffic halves;
   with 2 tokens a token's per-slot vectors take 3 NB registers each, so only for NB <= PAIR_BLOCKS). */
#define PAIR_BLOCKS 4

/* The writes M_t = alpha M_{t-1} + w x^T of tokens i .. i + TOKENS - 1 on rows j0 .. j1 - 1 of M, in
   place, and with each state M_t: with WEIGH, acc_t += M_t y_t (an S-vector: the rows' sum, as the
   scores K_t q_t); with READ, out_t = M_t^T p_t (a d-vector: each row's sum over the slots, as the reads
   V_t^T p_t). x, y, out are (n, d) and acc, p (n, S) buffers of the workspace */
static inline __attribute__((always_inline)) void write_rows(const int NB, const int TOKENS, const int WEIGH,
                                                             const int READ, const Workspace *ws, float *M,
                                                             const float *x, const float *y, float *acc,
                                                             const float *p, float *out, int64_t i, int64_t j0,
                                                             int64_t j1, int64_t d) {
    const int64_t S = NB * 16;
    v16 a[2][MAX_BLOCKS], w[2][MAX_BLOCKS], sum[2][MAX_BLOCKS], weight[2][MAX_BLOCKS];
    for (int u = 0; u < TOKENS; u++) {
        load_slots(NB, ws->a + (i + u) * S, a[u]);
        load_slots(NB, ws->w + (i + u) * S, w[u]);
        if (WEIGH) load_slots(NB, acc + (i + u) * S, sum[u]);
        if (READ) load_slots(NB, p + (i + u) * S, weight[u]);
    }
    const float *xi = x + i * d, *yi = y + i * d;
    for (int64_t j = j0; j < j1; j++) {
        v16 dot[2] = {a[0][0] * 0.0f, a[0][0] * 0.0f};
        for (int b = 0; b < NB; b++) {
            float *row = M + j * S + b * 16;
            v16 m = LOAD(row);
            for (int u = 0; u < TOKENS; u++) {
                m = a[u][b] * m + w[u][b] * xi[u * d + j];
                if (WEIGH) sum[u][b] += m * yi[u * d + j];
                if (READ) dot[u] += m * weight[u][b];
            }
            STORE(row, m);
        }
        if (READ)
            for (int u = 0; u < TOKENS; u++) out[(i + u) * d + j] = hsum(dot[u]);
    }
    if (WEIGH)
        for (int u = 0; u < TOKENS; u++)
            for (int b = 0; b < NB; b++) STORE(acc + (i + u) * S + b * 16, sum[u][b]);
}

/* A sweep of the span's n tokens over the state M, group by group (write_rows): two tokens at a time
   where their per-slot vectors fit the registers (3 NB each with WEIGH or READ: NB <= PAIR_BLOCKS) */
static inline __attribute__((always_inline)) void sweep(const int NB, const int WEIGH, const int READ,
                                                        const Workspace *ws, float *M, const float *x, const float *y,
                                                        float *acc, const float *p, float *out, int64_t n, int64_t d,
                                                        int64_t rows_per_group) {
    for (int64_t j0 = 0; j0 < d; j0 += rows_per_group) {
        const int64_t j1 = j0 + rows_per_group < d ? j0 + rows_per_group : d;
        int64_t i = 0;
        if (NB <= PAIR_BLOCKS && !(WEIGH && READ))
            for (; i + 1 < n; i += 2) write_rows(NB, 2, WEIGH, READ, ws, M, x, y, acc, p, out, i, j0, j1, d);
        for (; i < n; i++) write_rows(NB, 1, WEIGH, READ, ws, M, x, y, acc, p, out, i, j0, j1, d);
    }
}

/* The span's n reads (fp32 in ws->o) out, each RMS-normalized first with the norm (o * rsqrt(mean(o^2)
   + eps) * weight; the raw read and its rsqrt kept where reads_kept is not NULL); where those `ahead`
   tokens on go asked for */
static void store_reads(const Workspace *ws, int64_t r, int64_t t0, int64_t n, int64_t heads, int64_t T, int64_t d,
                        int bf16, const Options *opt, float *reads_kept, float *rstd_kept, void *out,
                        const Strides *so, int64_t ahead) {
    for (int64_t i = 0; i < n; i++) {
        float *o = ws->o + i * d;
        if (ahead) prefetch_token(out, bf16, so, heads, r, t0 + i + ahead, T, d, 1);
        if (opt->norm_weight) {
            float sum = 0.0f;
            _Pragma("omp simd reduction(+ : sum)") /* a vector sum: C may not reorder a float sum itself */
            for (int64_t j = 0; j < d; j++) sum += o[j] * o[j];
            const float rstd = 1.0f / sqrtf(sum / (float)d + opt->norm_eps);
            if (reads_kept) memcpy(reads_kept + (r * T + t0 + i) * d, o, sizeof(float) * d);
            if (rstd_kept) rstd_kept[r * T + t0 + i] = rstd;
            for (int64_t j = 0; j < d; j++) o[j] *= rstd * opt->norm_weight[j];
        }
        store(out, bf16, offset(so, heads, r, t0 + i), d, 1.0f, o);
    }
}

/* The gradients of the span's n reads into ws->o (fp32), through the norm where there is one (the
   raw reads rows `ld` apart from `reads`, their rsqrt from `rstd`): with x = o rstd and h = g weight,
   do = rstd (h - x mean(x h)); the norm weight's gradient summed in; those `ahead` tokens on asked for */
static void load_read_grads(const Workspace *ws, int64_t r, int64_t t0, int64_t n, int64_t heads, int64_t T,
                            int64_t d, int bf16, const Options *opt, const float *reads, int64_t ld,
                            const float *rstds, const void *d_out, const Strides *sdo, float *d_norm_weight,
                            int64_t ahead) {
    for (int64_t i = 0; i < n; i++) {
        float *g = ws->o + i * d;
        if (ahead) prefetch_token(d_out, bf16, sdo, heads, r, t0 + i + ahead, T, d, 0);
        load(d_out, bf16, offset(sdo, heads, r, t0 + i), d, 1.0f, g);
        if (opt->norm_weight) {
            const float *o = reads + i * ld, rstd = rstds[i];
            float dot = 0.0f;
            _Pragma("omp simd reduction(+ : dot)")
            for (int64_t j = 0; j < d; j++) {
                const float x = o[j] * rstd;
                dot += x * g[j] * opt->norm_weight[j];
                d_norm_weight[j] += g[j] * x;
            }
            dot /= (float)d;
            for (int64_t j = 0; j < d; j++) g[j] = rstd * (g[j] * opt->norm_weight[j] - o[j] * rstd * dot);
        }
    }
}

/* The span's gradients of q, k, v (fp32 in ws->dq, dk, dv; dq times q's scale on the way) and of
   the gates (d log alpha in ws->dalpha) out: none where the bound clamped the gate, as
   torch.clamp's gradient; for logits, times d logsigmoid(z) / dz = sigmoid(-z) = w; where those of
   the token `ahead` tokens on go asked for */
static inline __attribute__((always_inline)) void store_grads(
        const int NB, const Workspace *ws, int64_t r, int64_t t0, int64_t n, int64_t heads, int64_t T, int64_t d,
        int bf16, const Options *opt, const void *gate, const Strides *sg, void *dq, const Strides *sdq, void *dk,
        const Strides *sdk, void *dv, const Strides *sdv, void *d_gate, const Strides *sdg, int64_t ahead) {
    const int64_t S = NB * 16;
    for (int64_t i = 0; i < n; i++) {
        const int64_t t = t0 + i;
        if (ahead) {
            prefetch_token(dq, bf16, sdq, heads, r, t + ahead, T, d, 1);
            prefetch_token(dk, bf16, sdk, heads, r, t + ahead, T, d, 1);
            prefetch_token(dv, bf16, sdv, heads, r, t + ahead, T, d, 1);
            prefetch_token(d_gate, opt->gate_bf16, sdg, heads, r, t + ahead, T, S, 1);
        }
        store(dq, bf16, offset(sdq, heads, r, t), d, opt->q_scale, ws->dq + i * d);
        store(dk, bf16, offset(sdk, heads, r, t), d, 1.0f, ws->dk + i * d);
        store(dv, bf16, offset(sdv, heads, r, t), d, 1.0f, ws->dv + i * d);
        for (int b = 0; b < NB; b++) {
            const v16 g = load16(gate, opt->gate_bf16, offset(sg, heads, r, t) + b * 16), zero = g * 0.0f;
            const v16 grad = LOAD(ws->dalpha + i * S + b * 16);
            const v16 d_g = opt->gate_logits ? select(g >= zero + opt->gate_min, grad * LOAD(ws->w + i * S + b * 16), zero)
                                             : select((g >= zero + opt->gate_min) & (g <= zero), grad, zero);
            store16(d_gate, opt->gate_bf16, offset(sdg, heads, r, t) + b * 16, d_g);
        }
    }
}

static inline __attribute__((always_inline)) void forward_row(
        const int NB, int64_t r, int64_t heads, int64_t T, int64_t d, int64_t span, int64_t rows_per_group,
        int bf16, const void *q, const Strides *sq, const void *k, const Strides *sk, const void *v,
        const Strides *sv, const void *gate, const Strides *sg, const Options *opt, const float *K0,
        const Strides *sK0, const float *V0, const Strides *sV0, void *out, const Strides *so, float *p_kept,
        float *checkpoints, float *reads_kept, float *rstd_kept, float *K_final, float *V_final,
        const Workspace *ws) {
    const int64_t S = NB * 16, dS = d * S, spans = (T + span - 1) / span;
    float *K = ws->K, *V = ws->V;
    slots_to_state(K0 + offset(sK0, heads, r, 0), sK0->st, S, d, K);
    slots_to_state(V0 + offset(sV0, heads, r, 0), sV0->st, S, d, V);
    for (int64_t c = 0; c < spans; c++) {
        const int64_t t0 = c * span, n = t0 + span < T ? span : T - t0;
        if (checkpoints) { /* NULL when no backward will run */
            float *checkpoint = checkpoints + (r * spans + c) * 2 * dS;
            memcpy(checkpoint, K, sizeof(float) * dS);
            memcpy(checkpoint + dS, V, sizeof(float) * dS);
        }
        load_span(NB, ws, r, t0, n, heads, T, d, bf16, gate, sg, opt, q, sq, k, sk, v, sv, 1, span);
        memset(ws->z, 0, sizeof(float) * n * S);
        sweep(NB, 1, 0, ws, K, ws->k, ws->q, ws->z, NULL, NULL, n, d, rows_per_group); /* the key writes, the scores K_t q_t */
        softmax_rows(NB, ws->z, S, n, ws->z, p_kept ? p_kept + (r * T + t0) * S : NULL);
        sweep(NB, 0, 1, ws, V, ws->v, NULL, NULL, ws->z, ws->o, n, d, rows_per_group); /* the value writes, the reads */
        store_reads(ws, r, t0, n, heads, T, d, bf16, opt, reads_kept, rstd_kept, out, so, span);
    }
    state_to_slots(K, S, d, K_final + r * dS);
    state_to_slots(V, S, d, V_final + r * dS);
}

/* The backward, span by span in reverse, with the gradients G_t of the states carried back through
   the writes M_t = alpha M_{t-1} + w x^T: G_t = alpha_{t+1} G_{t+1} + E_t, where E_t is what token t's
   read adds (p_t do_t^T for V, dz_t q_t^T for K), dx_t = G_t^T w_t and dM_{t-1} = alpha_t G_t.
   The gate's gradient d log alpha_t = sum_j G_t (M_t - x_t) (per slot, both matrices) needs the
   states with the gradients; as Z_t - R_t, with R_t = sum_j G_t x_t^T (swept with the gradients) and
   Z_t = sum_j G_t M_t, which obeys Z_{t-1} = Z_t - w_t R_t + F_{t-1}, F_t = sum_j E_t M_t = p_t dp_t
   + dz_t z_t (from a_t M_{t-1} = M_t - w_t x_t^T), it needs them only where the reads meet them.
   Per span: two passes forward from the span's checkpoint, the state updated in place in the L1
   cache (no per-token states stored), give dp_t = V_t do_t, then dz_t (the softmax's backward), and
   dq_t = K_t^T dz_t with the scores z_t = K_t q_t; the reverse sweep carries G, gives dv, dk and R;
   Z starts at the span's end from sum_j G M (the state the passes leave) and runs back with R. */
static inline __attribute__((always_inline)) void backward_row(
        const int NB, int64_t r, int64_t heads, int64_t T, int64_t d, int64_t span, int64_t rows_per_group,
        int bf16, const void *q, const Strides *sq, const void *k, const Strides *sk, const void *v,
        const Strides *sv, const void *gate, const Strides *sg, const Options *opt, const float *p_kept,
        const float *checkpoints, const float *reads_kept, const float *rstd_kept, const void *d_out,
        const Strides *sdo, const float *dK_final, const float *dV_final, void *dq, const Strides *sdq, void *dk,
        const Strides *sdk, void *dv, const Strides *sdv, void *d_gate, const Strides *sdg, float *d_norm_weight,
        float *dK0, float *dV0, const Workspace *ws) {
    const int64_t S = NB * 16, dS = d * S, spans = (T + span - 1) / span;
    float *dK = ws->K, *dV = ws->V;
    slots_to_state(dK_final + r * dS, d, S, d, dK);
    slots_to_state(dV_final + r * dS, d, S, d, dV);
    for (int64_t c = spans - 1; c >= 0; c--) {
        const int64_t t0 = c * span, n = t0 + span < T ? span : T - t0;
        const float *checkpoint = checkpoints + (r * spans + c) * 2 * dS, *p = p_kept + (r * T + t0) * S;
        load_span(NB, ws, r, t0, n, heads, T, d, bf16, gate, sg, opt, q, sq, k, sk, v, sv, 1, -span);
        const int norm = opt->norm_weight != NULL;
        load_read_grads(ws, r, t0, n, heads, T, d, bf16, opt, norm ? reads_kept + (r * T + t0) * d : NULL, d,
                        norm ? rstd_kept + r * T + t0 : NULL, d_out, sdo, d_norm_weight, -span);
        /* forward: V_t in place, dp_t = V_t do_t (into ws->z) */
        memcpy(ws->Vs, checkpoint + dS, sizeof(float) * dS);
        memset(ws->z, 0, sizeof(float) * n * S);
        sweep(NB, 1, 0, ws, ws->Vs, ws->v, ws->o, ws->z, NULL, NULL, n, d, rows_per_group);
        for (int64_t i = 0; i < n; i++) { /* F_t = p dp; the softmax's backward dz = p (dp - p . dp), into ws->z */
            v16 lanes = LOAD(p) * 0.0f;
            for (int b = 0; b < NB; b++) lanes += LOAD(p + i * S + b * 16) * LOAD(ws->z + i * S + b * 16);
            const float pdp = hsum(lanes);
            for (int b = 0; b < NB; b++) {
                const v16 pb = LOAD(p + i * S + b * 16), dpb = LOAD(ws->z + i * S + b * 16);
                STORE(ws->f + i * S + b * 16, pb * dpb);
                STORE(ws->z + i * S + b * 16, pb * (dpb - pdp));
            }
        }
        /* forward: K_t in place, the scores z_t = K_t q_t (into ws->scores) and dq_t = K_t^T dz_t */
        memcpy(ws->Ks, checkpoint, sizeof(float) * dS);
        memset(ws->scores, 0, sizeof(float) * n * S);
        sweep(NB, 1, 1, ws, ws->Ks, ws->k, ws->q, ws->scores, ws->z, ws->dq, n, d, rows_per_group);
        /* Z at the span's last token: sum_j G M with the gradients carried in and the states the passes left */
        v16 Z[MAX_BLOCKS];
        for (int b = 0; b < NB; b++) Z[b] = LOAD(p) * 0.0f;
        for (int64_t j = 0; j < d; j++)
            for (int b = 0; b < NB; b++) {
                const int64_t at = j * S + b * 16;
                Z[b] += LOAD(dK + at) * LOAD(ws->Ks + at) + LOAD(dV + at) * LOAD(ws->Vs + at);
            }
        /* reverse: the carried gradients, dv, dk, and R_t (into ws->dalpha) */
        memset(ws->dalpha, 0, sizeof(float) * n * S);
        for (int64_t j0 = 0; j0 < d; j0 += rows_per_group) {
            const int64_t j1 = j0 + rows_per_group < d ? j0 + rows_per_group : d;
            for (int64_t i = n - 1; i >= 0; i--) {
                const float *doi = ws->o + i * d, *vi = ws->v + i * d, *qi = ws->q + i * d, *ki = ws->k + i * d;
                v16 a[MAX_BLOCKS], w[MAX_BLOCKS], pb[MAX_BLOCKS], dz[MAX_BLOCKS], R[MAX_BLOCKS];
                load_slots(NB, ws->a + i * S, a);
                load_slots(NB, ws->w + i * S, w);
                load_slots(NB, p + i * S, pb);
                load_slots(NB, ws->z + i * S, dz);
                load_slots(NB, ws->dalpha + i * S, R);
                for (int64_t j = j0; j < j1; j++) {
                    const float doj = doi[j], vj = vi[j], qj = qi[j], kj = ki[j];
                    v16 acc_v = a[0] * 0.0f, acc_k = acc_v;
                    for (int b = 0; b < NB; b++) {
                        float *gv = dV + j * S + b * 16, *gk = dK + j * S + b * 16;
                        const v16 g_v = LOAD(gv) + pb[b] * doj, g_k = LOAD(gk) + dz[b] * qj;
                        acc_v += w[b] * g_v;
                        acc_k += w[b] * g_k;
                        R[b] += g_v * vj + g_k * kj;
                        STORE(gv, a[b] * g_v);
                        STORE(gk, a[b] * g_k);
                    }
                    ws->dv[i * d + j] = hsum(acc_v);
                    ws->dk[i * d + j] = hsum(acc_k);
                }
                for (int b = 0; b < NB; b++) STORE(ws->dalpha + i * S + b * 16, R[b]);
            }
        }
        /* d log alpha_t = Z_t - R_t, Z_{t-1} = Z_t - w_t R_t + F_{t-1}, in place of R */
        v16 R_next[MAX_BLOCKS] = {0};
        for (int64_t i = n - 1; i >= 0; i--)
            for (int b = 0; b < NB; b++) {
                const int64_t at = i * S + b * 16;
                if (i < n - 1) Z[b] -= LOAD(ws->w + at + S) * R_next[b];
                Z[b] += LOAD(ws->f + at) + LOAD(ws->z + at) * LOAD(ws->scores + at);
                R_next[b] = LOAD(ws->dalpha + at);
                STORE(ws->dalpha + at, Z[b] - R_next[b]);
            }
        store_grads(NB, ws, r, t0, n, heads, T, d, bf16, opt, gate, sg, dq, sdq, dk, sdk, dv, sdv, d_gate, sdg, -span);
    }
    state_to_slots(dK, S, d, dK0 + r * dS);
    state_to_slots(dV, S, d, dV0 + r * dS);
}

/* The number of 16-slot blocks as a constant in each instance (registers, unrolled loops). */
#define BY_BLOCKS(NB, CALL) switch (NB) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; default: CALL(8); break; }

#ifndef GROUP_ROWS
#define GROUP_ROWS 32
#endif
/* Rows of a group: GROUP_ROWS (the group's slice of the state, or in the backward's reverse
   sweep of both states' gradients, stays in the L1 cache while the span's tokens pass) */
static int64_t group_rows(int64_t span, int64_t d, int64_t S) {
    (void)span, (void)S;
    return GROUP_ROWS < d ? GROUP_ROWS : d;
}

/* Each entry point: the rows in parallel, each thread with its workspace, denormals flushed,
   every row through CALL(NB) with the number of 16-slot blocks as a constant; returns 0, or -1
   where S is not a multiple of 16 in 16..128 (nothing written). */
#define FOR_EACH_ROW(CALL)                                                                             \
    if (S % 16 != 0 || S < 16 || S > 16 * MAX_BLOCKS) return -1;                                       \
    const int NB = (int)(S / 16);                                                                      \
    const int64_t per_group = group_rows(span, d, S);                                                  \
    _Pragma("omp parallel num_threads(threads)") {                                                     \
        FLUSH_DENORMALS                                                                                \
        const int thread = omp_get_thread_num();                                                       \
        float *buf = aligned_alloc(64, sizeof(float) * ((workspace_floats(span, d, S) + 15) / 16 * 16)); \
        const Workspace ws = workspace(buf, span, d, S);                                    \
        (void)thread;                                                                                  \
        _Pragma("omp for schedule(static)")                                                            \
        for (int64_t r = 0; r < rows; r++) BY_BLOCKS(NB, CALL)                                         \
        free(buf);                                                                                     \
        RESTORE_DENORMALS                                                                              \
    }                                                                                                  \
    return 0;

/* The forward keeps p and the checkpoints for the backward (and with the norm, the raw reads and
   their rsqrt); any may be NULL, when none will run. */
int kv_memory_forward(int64_t rows, int64_t heads, int64_t T, int64_t d, int64_t S, int64_t span, int bf16,
                      const void *q, Strides sq, const void *k, Strides sk, const void *v, Strides sv,
                      const void *gate, Strides sg, Options opt, const float *K0, Strides sK0, const float *V0,
                      Strides sV0, void *out, Strides so, float *p_kept, float *checkpoints, float *reads_kept,
                      float *rstd_kept, float *K_final, float *V_final, int threads) {
#define FORWARD(N) forward_row(N, r, heads, T, d, span, per_group, bf16, q, &sq, k, &sk, v, &sv, gate, &sg, &opt, \
                               K0, &sK0, V0, &sV0, out, &so, p_kept, checkpoints, reads_kept, rstd_kept, K_final, V_final, &ws)
    FOR_EACH_ROW(FORWARD)
}

/* d_norm_weight: (threads, d) fp32, zeros, each thread's sum over its rows' tokens (with the norm) */
int kv_memory_backward(int64_t rows, int64_t heads, int64_t T, int64_t d, int64_t S, int64_t span, int bf16,
                       const void *q, Strides sq, const void *k, Strides sk, const void *v, Strides sv,
                       const void *gate, Strides sg, Options opt, const float *p_kept, const float *checkpoints,
                       const float *reads_kept, const float *rstd_kept, const void *d_out, Strides sdo,
                       const float *dK_final, const float *dV_final, void *dq, Strides sdq, void *dk, Strides sdk,
                       void *dv, Strides sdv, void *d_gate, Strides sdg, float *d_norm_weight, float *dK0, float *dV0,
                       int threads) {
#define BACKWARD(N) backward_row(N, r, heads, T, d, span, per_group, bf16, q, &sq, k, &sk, v, &sv, gate, &sg, &opt, \
                                 p_kept, checkpoints, reads_kept, rstd_kept, d_out, &sdo, dK_final, dV_final, dq, \
                                 &sdq, dk, &sdk, dv, &sdv, d_gate, &sdg, d_norm_weight ? d_norm_weight + thread * d : NULL, dK0, \
                                 dV0, &ws)
    FOR_EACH_ROW(BACKWARD)
}

/* ============================================================================================
 * The chunked form on AMX tiles: bf16 inputs on CPUs with AMX-BF16 (Intel Sapphire Rapids on).
 *
 * The same function, chunk by chunk instead of token by token: per chunk of n <= 32 tokens, with
 * the decays from the chunk's start A_i = prod_{l <= i} alpha_l, the same centred on its middle
 * token m, C_i = A_i / A_m, u_j = w_j / C_j (so C_i u_j is the weight token j's write keeps at
 * token i) and E_j = C_{n-1} u_j (its weight at the chunk's end), with K, V the state at the
 * chunk's start (d x S) and s the query's scale:
 *
 *     qk = s tril(q k^T),  scores = A * (s q K) + C * (qk u),  p = softmax(scores)
 *     o = (p * A) V^T + tril((p * C) u^T) v
 *     K' = A_{n-1} * K + k^T E,   V' likewise with v
 *
 * (kv_memory.py's chunked form, the same algebra; here the decays are running products, no
 * logs.) Every product is a bf16 matmul on the tiles with fp32 sums; the decays, the softmax
 * and the gates' gradient are fp32. Where rounding a product's fp32 operand (a state, u, a
 * gradient) to bf16 made the worst error against the fp64 reference 1.4x or more the error with
 * every operand paired (each product tried alone; the largest left unpaired, 1.37x) (the products
 * with u, where terms cancel in the gates' gradient, and those with the states or the reads'
 * gradient), that operand is carried as a bf16 pair (hi + lo, about 16 bits of mantissa): the
 * outputs and gradients then sit within 1.7x the fp32 recurrence kernel's error (both under
 * 0.4% relative RMS); the chunk-start states carry bf16 writes (1.4e-3 relative). The forward
 * keeps the chunk-start states, the scores and (with the norm) the raw reads and their rsqrt; the
 * backward runs the chunks in reverse, carrying the state's gradient, each chunk's softmax and
 * products recomputed from what was kept and differentiated as KVMemoryChunked's.
 * ============================================================================================ */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
long syscall(long number, ...); /* unistd.h declares it only with _GNU_SOURCE, which would also declare select() */

#define CHUNK 32

/* Linux hands a process the tile registers only on request; 1 when granted */
int kv_memory_tiles_ready(void) { return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Every tile 16 rows of 64 bytes: 16 x 16 fp32 or 16 x 32 bf16 */
static void configure_tiles(void) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.colsb[i] = 64;
        c.rows[i] = 16;
    }
    _tile_loadconfig(&c);
}

/* dst = src, n floats, for the backward: written past the caches (non-temporal stores) where both
   are 64-byte aligned and n is a multiple of 16 (the backward reads it after the rest of the model's
   forward, so caching it only evicts the working set and reads each line in before writing it: with
   the chunk-start states so written the tiles' forward ran 1.1x faster at the paper's shape, C harness;
   the recurrence's keeps, a few KiB a span, ran no faster so); callers fence (_mm_sfence) before their
   results are read */
static inline void keep_copy(float *dst, const float *src, int64_t n) {
    if ((((uintptr_t)dst | (uintptr_t)src) & 63) == 0 && n % 16 == 0) {
        for (int64_t e = 0; e < n; e += 16) _mm512_stream_ps(dst + e, _mm512_load_ps(src + e));
        return;
    }
    memcpy(dst, src, sizeof(float) * n);
}

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
static inline __mmask16 first(int64_t n) { return n >= 16 ? 0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* dst (Mp x Kp bf16) = src (M x K fp32, rows ld apart), zeros beyond; 32 lanes a conversion (Kp is a
   multiple of 32) */
static void bf16_rows(const float *src, int64_t ld, int64_t M, int64_t K, int64_t Mp, int64_t Kp, uint16_t *dst,
                      int residual) {
    for (int64_t m = 0; m < Mp; m++) {
        const float *row = m < M ? src + m * ld : NULL;
        for (int64_t k = 0; k < Kp; k += 32) {
            __m512 lo = row ? _mm512_maskz_loadu_ps(first(K - k), row + k) : _mm512_setzero_ps();
            __m512 hi = row ? _mm512_maskz_loadu_ps(first(K - k - 16), row + k + 16) : _mm512_setzero_ps();
            __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
            if (residual) {
                lo = _mm512_sub_ps(lo, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(both)), 16)));
                hi = _mm512_sub_ps(hi, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(both, 1)), 16)));
                both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
            }
            _mm512_storeu_si512(dst + m * Kp + k, both);
        }
    }
}

/* The same from a bf16 src (its values exact in bf16: no residual): the rows copied */
static void bf16_rows_of_bf16(const uint16_t *src, int64_t ld, int64_t M, int64_t K, int64_t Mp, int64_t Kp,
                              uint16_t *dst) {
    for (int64_t m = 0; m < Mp; m++)
        for (int64_t k = 0; k < Kp; k += 32) {
            const __mmask32 mask = m < M ? (K - k >= 32 ? 0xffffffffu : K - k <= 0 ? 0 : (1u << (K - k)) - 1) : 0;
            _mm512_storeu_si512(dst + m * Kp + k, _mm512_maskz_loadu_epi16(mask, src + m * ld + k));
        }
}

/* dst ((Kp / 2) x Np pairs of bf16) = src (K x N fp32, rows ld apart) with rows 2i and 2i + 1 interleaved:
   the pair (src[2i][n], src[2i + 1][n]) at (i, n), the tiles' layout of a right-hand operand. Both rows'
   16 lanes convert in one instruction, one permutation interleaves them */
static void bf16_row_pairs(const float *src, int64_t ld, int64_t K, int64_t N, int64_t Kp, int64_t Np,
                           uint16_t *dst, int residual) {
    static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i interleave = _mm512_loadu_si512(order);
    for (int64_t i = 0; i < Kp / 2; i++) {
        const float *even_row = 2 * i < K ? src + 2 * i * ld : NULL, *odd_row = 2 * i + 1 < K ? src + (2 * i + 1) * ld : NULL;
        for (int64_t n = 0; n < Np; n += 16) {
            const __mmask16 mask = first(N - n);
            __m512 even = even_row ? _mm512_maskz_loadu_ps(mask, even_row + n) : _mm512_setzero_ps();
            __m512 odd = odd_row ? _mm512_maskz_loadu_ps(mask, odd_row + n) : _mm512_setzero_ps();
            __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even); /* even's 16 in the low half, odd's in the high */
            if (residual) {
                const __m512i low = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(both));
                const __m512i high = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(both, 1));
                even = _mm512_sub_ps(even, _mm512_castsi512_ps(_mm512_slli_epi32(low, 16)));
                odd = _mm512_sub_ps(odd, _mm512_castsi512_ps(_mm512_slli_epi32(high, 16)));
                both = (__m512i)_mm512_cvtne2ps_pbh(odd, even);
            }
            _mm512_storeu_si512(dst + i * 2 * Np + 2 * n, _mm512_permutexvar_epi16(interleave, both));
        }
    }
}

/* The same from a bf16 src: each pair of rows' 16 lanes side by side, one permutation interleaves them */
static void bf16_row_pairs_of_bf16(const uint16_t *src, int64_t ld, int64_t K, int64_t N, int64_t Kp, int64_t Np,
                                   uint16_t *dst) {
    static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i interleave = _mm512_loadu_si512(order);
    for (int64_t i = 0; i < Kp / 2; i++)
        for (int64_t n = 0; n < Np; n += 16) {
            const __mmask16 mask = first(N - n);
            const __m256i even = 2 * i < K ? _mm256_maskz_loadu_epi16(mask, src + 2 * i * ld + n) : _mm256_setzero_si256();
            const __m256i odd = 2 * i + 1 < K ? _mm256_maskz_loadu_epi16(mask, src + (2 * i + 1) * ld + n)
                                              : _mm256_setzero_si256();
            const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(even), odd, 1);
            _mm512_storeu_si512(dst + i * 2 * Np + 2 * n, _mm512_permutexvar_epi16(interleave, both));
        }
}

/* dst (C x R, rows ld_dst apart) = src (R x C, rows ld_src apart) transposed: 32-bit words, R and C
   multiples of 16, 16 x 16 blocks in registers */
static void transpose_words(const uint32_t *src, int64_t ld_src, int64_t R, int64_t C, uint32_t *dst, int64_t ld_dst) {
    for (int64_t r0 = 0; r0 < R; r0 += 16)
        for (int64_t c0 = 0; c0 < C; c0 += 16) {
            __m512i x[16], t[16];
            for (int i = 0; i < 16; i++) x[i] = _mm512_loadu_si512(src + (r0 + i) * ld_src + c0);
            for (int i = 0; i < 8; i++) {
                t[2 * i] = _mm512_unpacklo_epi32(x[2 * i], x[2 * i + 1]);
                t[2 * i + 1] = _mm512_unpackhi_epi32(x[2 * i], x[2 * i + 1]);
            }
            for (int i = 0; i < 4; i++) {
                x[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
                x[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
                x[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
                x[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
            }
            uint32_t *out = dst + c0 * ld_dst + r0;
            for (int c = 0; c < 4; c++) {
                const __m512i v0 = _mm512_shuffle_i32x4(x[c], x[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(x[c], x[4 + c], 0xEE);
                const __m512i w0 = _mm512_shuffle_i32x4(x[8 + c], x[12 + c], 0x44), w1 = _mm512_shuffle_i32x4(x[8 + c], x[12 + c], 0xEE);
                _mm512_storeu_si512(out + c * ld_dst, _mm512_shuffle_i32x4(v0, w0, 0x88));
                _mm512_storeu_si512(out + (c + 4) * ld_dst, _mm512_shuffle_i32x4(v0, w0, 0xDD));
                _mm512_storeu_si512(out + (c + 8) * ld_dst, _mm512_shuffle_i32x4(v1, w1, 0x88));
                _mm512_storeu_si512(out + (c + 12) * ld_dst, _mm512_shuffle_i32x4(v1, w1, 0xDD));
            }
        }
}

/* An operand of a product: fp32 (x) or bf16 (h, exact: never split), rows ld apart, read as stored
   (ROWS) or transposed (COLS) */
enum { ROWS = 0, COLS = 1 };
typedef struct {
    const float *x;
    const uint16_t *h;
    int64_t ld;
    int layout;
} Operand;

#define TILE_MAX 128 /* d and S padded at most */
typedef struct {
    uint16_t *a[2], *b[2], *scratch; /* the packed operands (hi, lo), and the transposes' (TILE_MAX^2 bf16 each) */
} Packs;

/* An operand's rows (M x K) as bf16 rows of Kp, or its rows by pairs (K x N as (Kp / 2) x Np pairs), from
   its fp32 (x) or bf16 (h) source */
static void operand_rows(Operand a, int64_t M, int64_t K, int64_t Mp, int64_t Kp, uint16_t *dst, int residual) {
    if (a.h)
        bf16_rows_of_bf16(a.h, a.ld, M, K, Mp, Kp, dst);
    else
        bf16_rows(a.x, a.ld, M, K, Mp, Kp, dst, residual);
}

static void operand_row_pairs(Operand a, int64_t K, int64_t N, int64_t Kp, int64_t Np, uint16_t *dst, int residual) {
    if (a.h)
        bf16_row_pairs_of_bf16(a.h, a.ld, K, N, Kp, Np, dst);
    else
        bf16_row_pairs(a.x, a.ld, K, N, Kp, Np, dst, residual);
}

/* The left operand A (M x K) as bf16 rows of Kp into dst: as stored, or from (K x M) rows by pairs then transposed */
static void pack_left(Operand A, int64_t M, int64_t K, int64_t Mp, int64_t Kp, uint16_t *dst, uint16_t *scratch,
                      int residual) {
    if (A.layout == ROWS) {
        operand_rows(A, M, K, Mp, Kp, dst, residual);
        return;
    }
    operand_row_pairs(A, K, M, Kp, Mp, scratch, residual);                                /* (Kp / 2) x Mp words */
    transpose_words((const uint32_t *)scratch, Mp, Kp / 2, Mp, (uint32_t *)dst, Kp / 2); /* Mp x (Kp / 2) words */
}

/* The right operand B (K x N) as pairs of rows into dst: from (K x N) rows, or from (N x K) rows transposed */
static void pack_right(Operand B, int64_t K, int64_t N, int64_t Kp, int64_t Np, uint16_t *dst, uint16_t *scratch,
                       int residual) {
    if (B.layout == ROWS) {
        operand_row_pairs(B, K, N, Kp, Np, dst, residual);
        return;
    }
    operand_rows(B, N, K, Np, Kp, scratch, residual);                                     /* Np x (Kp / 2) words */
    transpose_words((const uint32_t *)scratch, Kp / 2, Np, Kp / 2, (uint32_t *)dst, Np); /* (Kp / 2) x Np words */
}

/* One block of up to 2 x 2 output tiles (tiles 0-3; A's in 4-5, B's in 6-7): independent sums in
   flight, where one tile's chain of products would wait on each product's latency */
#define TILE_BLOCK(MT, NT)                                                                              \
    do {                                                                                                \
        float *c = C + m * ldc + n;                                                                     \
        if (accumulate) {                                                                               \
            _tile_loadd(0, c, ldc * 4);                                                                 \
            if (NT > 1) _tile_loadd(1, c + 16, ldc * 4);                                                \
            if (MT > 1) _tile_loadd(2, c + 16 * ldc, ldc * 4);                                          \
            if (MT > 1 && NT > 1) _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);                           \
        } else {                                                                                        \
            _tile_zero(0);                                                                              \
            if (NT > 1) _tile_zero(1);                                                                  \
            if (MT > 1) _tile_zero(2);                                                                  \
            if (MT > 1 && NT > 1) _tile_zero(3);                                                        \
        }                                                                                               \
        for (int64_t k = 0; k < Kp; k += 32) {                                                          \
            _tile_loadd(4, A + m * Kp + k, Kp * 2);                                                     \
            _tile_loadd(6, B + k * Np + 2 * n, Np * 4);                                                 \
            _tile_dpbf16ps(0, 4, 6);                                                                    \
            if (NT > 1) {                                                                               \
                _tile_loadd(7, B + k * Np + 2 * (n + 16), Np * 4);                                      \
                _tile_dpbf16ps(1, 4, 7);                                                                \
            }                                                                                           \
            if (MT > 1) {                                                                               \
                _tile_loadd(5, A + (m + 16) * Kp + k, Kp * 2);                                          \
                _tile_dpbf16ps(2, 5, 6);                                                                \
                if (NT > 1) _tile_dpbf16ps(3, 5, 7);                                                    \
            }                                                                                           \
        }                                                                                               \
        _tile_stored(0, c, ldc * 4);                                                                    \
        if (NT > 1) _tile_stored(1, c + 16, ldc * 4);                                                   \
        if (MT > 1) _tile_stored(2, c + 16 * ldc, ldc * 4);                                             \
        if (MT > 1 && NT > 1) _tile_stored(3, c + 16 * ldc + 16, ldc * 4);                              \
    } while (0)

/* C (Mp x Np fp32, rows ldc apart) = (C if accumulate) + A B on the tiles, A as bf16 rows of Kp,
   B as pairs of rows; Mp, Np multiples of 16, Kp of 32 */
static void tile_product(int64_t Mp, int64_t Np, int64_t Kp, const uint16_t *A, const uint16_t *B, float *C,
                         int64_t ldc, int accumulate) {
    for (int64_t m = 0; m < Mp; m += 32)
        for (int64_t n = 0; n < Np; n += 32) {
            const int two_m = m + 32 <= Mp, two_n = n + 32 <= Np;
            if (two_m && two_n)
                TILE_BLOCK(2, 2);
            else if (two_m)
                TILE_BLOCK(2, 1);
            else if (two_n)
                TILE_BLOCK(1, 2);
            else
                TILE_BLOCK(1, 1);
        }
}

/* Which operands of a product are carried as bf16 pairs (hi + lo: about 16 bits of mantissa) */
enum { ONE = 0, SPLIT_A = 1, SPLIT_B = 2, SPLIT_BOTH = 3 };

/* C (M x N fp32, rows ldc apart; its padding to multiples of 16 overwritten) = (C if accumulate) + A B,
   A (M x K) and B (K x N) rounded to bf16, or as pairs where `split` says (A B ~ hi hi + lo hi + hi lo) */
static void product(const Packs *pk, int64_t M, int64_t N, int64_t K, Operand A, Operand B, float *C, int64_t ldc,
                    int accumulate, int split) {
    const int64_t Mp = round_up(M, 16), Np = round_up(N, 16), Kp = round_up(K, 32);
    pack_left(A, M, K, Mp, Kp, pk->a[0], pk->scratch, 0);
    pack_right(B, K, N, Kp, Np, pk->b[0], pk->scratch, 0);
    tile_product(Mp, Np, Kp, pk->a[0], pk->b[0], C, ldc, accumulate);
    if (split & SPLIT_A) {
        pack_left(A, M, K, Mp, Kp, pk->a[1], pk->scratch, 1);
        tile_product(Mp, Np, Kp, pk->a[1], pk->b[0], C, ldc, 1);
    }
    if (split & SPLIT_B) {
        pack_right(B, K, N, Kp, Np, pk->b[1], pk->scratch, 1);
        tile_product(Mp, Np, Kp, pk->a[0], pk->b[1], C, ldc, 1);
    }
}

static inline Operand rows_of(const float *x, int64_t ld) { return (Operand){x, NULL, ld, ROWS}; }
static inline Operand cols_of(const float *x, int64_t ld) { return (Operand){x, NULL, ld, COLS}; }
static inline Operand cols(Operand a) { a.layout = COLS; return a; } /* an operand read transposed */

/* A chunk's rows of a bf16 input (q, k or v) where they sit, its tokens st apart, as an operand */
static inline Operand input_rows(const void *x, const Strides *sx, int64_t heads, int64_t r, int64_t t0) {
    return (Operand){NULL, (const uint16_t *)x + offset(sx, heads, r, t0), sx->st, ROWS};
}

/* The chunk's inputs as operands */
typedef struct {
    Operand q, k, v;
} Inputs;

/* A chunk's fp32 arrays, CHUNK x L (L = ld: d and S padded) unless said, and its packs */
typedef struct {
    int64_t ld;
    float *A, *C, *u, *E;                        /* the decays (n x S) */
    float *qk, *X, *Y, *scores, *r, *rc, *mix, *o; /* the forward's products; r = p A, rc = p C; the reads */
    float *d_mix, *dr, *dp, *pdp, *dsc, *dX, *dY, *d_qk, *dq, *dk, *dv, *du, *dE; /* the backward's */
    float *state;                                /* TILE_MAX x L: a product of a state's size */
    float *gK, *gV;                              /* TILE_MAX x L: the chunk-start states' own gradients */
    Packs packs;
} Chunk;

#define CHUNK_ARRAYS 25
static int64_t chunk_floats(int64_t ld) { return (int64_t)CHUNK_ARRAYS * CHUNK * ld + 3 * TILE_MAX * ld; }
static int64_t chunk_halves(void) { return 5 * TILE_MAX * TILE_MAX; }

static Chunk chunk_work(float *buf, uint16_t *halves, int64_t ld) {
    Chunk w;
    float **arrays[CHUNK_ARRAYS] = {&w.A, &w.C, &w.u, &w.E, &w.qk, &w.X, &w.Y, &w.scores, &w.r, &w.rc, &w.mix, &w.o,
                                    &w.d_mix, &w.dr, &w.dp, &w.pdp, &w.dsc, &w.dX, &w.dY, &w.d_qk, &w.dq, &w.dk,
                                    &w.dv, &w.du, &w.dE};
    w.ld = ld;
    for (int i = 0; i < CHUNK_ARRAYS; i++) *arrays[i] = buf + i * CHUNK * ld;
    w.state = buf + CHUNK_ARRAYS * CHUNK * ld;
    w.gK = w.state + TILE_MAX * ld;
    w.gV = w.gK + TILE_MAX * ld;
    for (int i = 0; i < 2; i++) {
        w.packs.a[i] = halves + i * TILE_MAX * TILE_MAX;
        w.packs.b[i] = halves + (2 + i) * TILE_MAX * TILE_MAX;
    }
    w.packs.scratch = halves + 4 * TILE_MAX * TILE_MAX;
    return w;
}

/* The chunk's decays from its gates (ws->a, ws->w: alpha and 1 - alpha, n x S): A, C, u, E as above,
   by running products (alpha >= e^-4: C and u stay within e^+-64 over half a chunk) */
static inline __attribute__((always_inline)) void chunk_decays(const int NB, const Workspace *ws, const Chunk *w,
                                                               int64_t n) {
    const int64_t S = NB * 16, L = w->ld, m = n / 2;
    for (int b = 0; b < NB; b++) {
        const int64_t s = b * 16;
        v16 prod = LOAD(ws->a + s) * 0.0f + 1.0f;
        for (int64_t i = 0; i < n; i++) { /* A_i from the chunk's start */
            prod *= LOAD(ws->a + i * S + s);
            STORE(w->A + i * L + s, prod);
        }
        v16 ahead = prod * 0.0f + 1.0f; /* C_i = prod_{m < l <= i} alpha_l for i >= m */
        for (int64_t i = m; i < n; i++) {
            if (i > m) ahead *= LOAD(ws->a + i * S + s);
            STORE(w->C + i * L + s, ahead);
            STORE(w->u + i * L + s, LOAD(ws->w + i * S + s) / ahead);
        }
        v16 behind = ahead * 0.0f + 1.0f; /* C_i = 1 / prod_{i < l <= m} alpha_l for i < m, u_i = w_i prod */
        for (int64_t i = m - 1; i >= 0; i--) {
            behind *= LOAD(ws->a + (i + 1) * S + s);
            STORE(w->C + i * L + s, 1.0f / behind);
            STORE(w->u + i * L + s, LOAD(ws->w + i * S + s) * behind);
        }
        v16 after = behind * 0.0f + 1.0f; /* E_j = w_j prod_{j < l < n} alpha_l */
        for (int64_t j = n - 1; j >= 0; j--) {
            STORE(w->E + j * L + s, LOAD(ws->w + j * S + s) * after);
            after *= LOAD(ws->a + j * S + s);
        }
    }
}

/* Zeros above the diagonal of an n x n array (rows L apart), as tril */
static void lower_triangle(float *x, int64_t n, int64_t L) {
    for (int64_t i = 0; i < n; i++) memset(x + i * L + i + 1, 0, sizeof(float) * (n - i - 1));
}

/* qk = s tril(q k^T), from the chunk's q, k (n x d): both passes need it */
static void chunk_qk(const Inputs *in, const Chunk *w, int64_t n, int64_t d, float scale) {
    const int64_t L = w->ld;
    product(&w->packs, n, n, d, in->q, cols(in->k), w->qk, L, 0, ONE);
    for (int64_t i = 0; i < n; i++) {
        for (int64_t j = 0; j <= i; j++) w->qk[i * L + j] *= scale;
        memset(w->qk + i * L + i + 1, 0, sizeof(float) * (n - i - 1));
    }
}

/* The forward's scores from q (n x d), qk and the chunk-start key state K (d x S):
   X = s q K, Y = qk u and scores = A X + C Y */
static inline __attribute__((always_inline)) void chunk_scores(const int NB, const Inputs *in, const Chunk *w,
                                                               const float *K, int64_t n, int64_t d, float scale) {
    const int64_t S = NB * 16, L = w->ld;
    product(&w->packs, n, S, d, in->q, rows_of(K, S), w->X, L, 0, SPLIT_B);
    product(&w->packs, n, S, n, rows_of(w->qk, L), rows_of(w->u, L), w->Y, L, 0, SPLIT_BOTH);
    for (int64_t i = 0; i < n; i++)
        for (int b = 0; b < NB; b++) {
            const int64_t at = i * L + b * 16;
            STORE(w->scores + at, LOAD(w->A + at) * (scale * LOAD(w->X + at)) + LOAD(w->C + at) * LOAD(w->Y + at));
        }
}

/* r = p A and rc = p C (p: n x S rows S apart) */
static inline __attribute__((always_inline)) void chunk_weights(const int NB, const Chunk *w, const float *p, int64_t n) {
    const int64_t S = NB * 16, L = w->ld;
    for (int64_t i = 0; i < n; i++)
        for (int b = 0; b < NB; b++) {
            const int64_t at = i * L + b * 16;
            const v16 pi = LOAD(p + i * S + b * 16);
            STORE(w->r + at, pi * LOAD(w->A + at));
            STORE(w->rc + at, pi * LOAD(w->C + at));
        }
}

/* M (d x S) = A_{n-1} M + x^T E: a state carried over the chunk, x (n x d) its writes */
static inline __attribute__((always_inline)) void chunk_carry(const int NB, const Chunk *w, float *M, Operand x,
                                                              int64_t n, int64_t d) {
    const int64_t S = NB * 16, L = w->ld;
    product(&w->packs, d, S, n, cols(x), rows_of(w->E, L), w->state, L, 0, ONE);
    for (int64_t j = 0; j < d; j++)
        for (int b = 0; b < NB; b++)
            STORE(M + j * S + b * 16, LOAD(w->A + (n - 1) * L + b * 16) * LOAD(M + j * S + b * 16) + LOAD(w->state + j * L + b * 16));
}

/* The chunk's softmax p of its scores (rows ld apart; into ws->z, n x S), r, rc and mix; with `reads`,
   its reads too (into w->o) */
static inline __attribute__((always_inline)) void chunk_reads(const int NB, const Workspace *ws, const Inputs *in,
                                                              const Chunk *w, const float *scores, int64_t ld,
                                                              const float *V, int64_t n, int64_t d, int reads) {
    const int64_t S = NB * 16, L = w->ld;
    softmax_rows(NB, scores, ld, n, ws->z, NULL);
    for (int64_t i = 0; i < n; i++)
        for (int b = 0; b < NB; b++) {
            const v16 z = LOAD(ws->z + i * S + b * 16);
            STORE(w->r + i * L + b * 16, z * LOAD(w->A + i * L + b * 16));
            STORE(w->rc + i * L + b * 16, z * LOAD(w->C + i * L + b * 16));
        }
    product(&w->packs, n, n, S, rows_of(w->rc, L), cols_of(w->u, L), w->mix, L, 0, ONE);
    lower_triangle(w->mix, n, L);
    if (!reads) return;
    product(&w->packs, n, d, S, rows_of(w->r, L), cols_of(V, S), w->o, L, 0, ONE);
    product(&w->packs, n, d, n, rows_of(w->mix, L), in->v, w->o, L, 1, SPLIT_A);
}

/* The forward on the tiles: kv_memory_forward's, keeping for the backward the chunk-start states
   (`checkpoints`, as the recurrence's), the scores before the softmax (`scores_kept`, rows x T x S, in
   place of the recurrence's p: the backward needs both) and with the norm the raw reads and their
   rsqrt; each NULL where no backward will run */
static inline __attribute__((always_inline)) void forward_row_tiles(
        const int NB, int64_t r, int64_t heads, int64_t T, int64_t d, int64_t span, int bf16, const void *q,
        const Strides *sq, const void *k, const Strides *sk, const void *v, const Strides *sv, const void *gate,
        const Strides *sg, const Options *opt, const float *K0, const Strides *sK0, const float *V0, const Strides *sV0,
        void *out, const Strides *so, float *scores_kept, float *checkpoints, float *reads_kept, float *rstd_kept,
        float *K_final, float *V_final, const Workspace *ws, const Chunk *w) {
    const int64_t S = NB * 16, dS = d * S, spans = (T + span - 1) / span, L = w->ld;
    Options unscaled = *opt; /* q as it is (bf16: exact); its scale goes on the products */
    unscaled.q_scale = 1.0f;
    float *K = ws->K, *V = ws->V;
    slots_to_state(K0 + offset(sK0, heads, r, 0), sK0->st, S, d, K);
    slots_to_state(V0 + offset(sV0, heads, r, 0), sV0->st, S, d, V);
    for (int64_t c = 0; c < spans; c++) {
        const int64_t t0 = c * span, n = t0 + span < T ? span : T - t0;
        if (checkpoints) {
            keep_copy(checkpoints + (r * spans + c) * 2 * dS, K, dS);
            keep_copy(checkpoints + (r * spans + c) * 2 * dS + dS, V, dS);
        }
        load_span(NB, ws, r, t0, n, heads, T, d, bf16, gate, sg, &unscaled, q, sq, k, sk, v, sv, 0, span);
        const Inputs in = {input_rows(q, sq, heads, r, t0), input_rows(k, sk, heads, r, t0),
                           input_rows(v, sv, heads, r, t0)};
        chunk_decays(NB, ws, w, n);
        chunk_qk(&in, w, n, d, opt->q_scale);
        chunk_scores(NB, &in, w, K, n, d, opt->q_scale);
        if (scores_kept)
            for (int64_t i = 0; i < n; i++) keep_copy(scores_kept + (r * T + t0 + i) * S, w->scores + i * L, S);
        chunk_reads(NB, ws, &in, w, w->scores, L, V, n, d, 1);
        for (int64_t i = 0; i < n; i++) memcpy(ws->o + i * d, w->o + i * L, sizeof(float) * d);
        store_reads(ws, r, t0, n, heads, T, d, bf16, opt, reads_kept, rstd_kept, out, so, span);
        chunk_carry(NB, w, K, in.k, n, d);
        chunk_carry(NB, w, V, in.v, n, d);
    }
    state_to_slots(K, S, d, K_final + r * dS);
    state_to_slots(V, S, d, V_final + r * dS);
    _mm_sfence(); /* keep_copy's stores, before the backward reads them */
}

/* The backward on the tiles: from the chunk-start states the forward kept (checkpoints, spans x 2 x d x S
   a row) and its scores, the chunks in reverse, each recomputed (qk, the softmax, mix) and differentiated, with
   gK, gV the gradients of the state at the chunk's end, carried (d x S):
       dp = A (dO V) + C (tril(dO v^T) u),  dscores = p (dp - p . dp),  dX = dscores A,  dY = dscores C
       dq = s (tril(dY u^T) k + dX K^T),  dk = s tril(dY u^T)^T q + E gK^T,  dv = mix^T dO + E gV^T
   and for the gates, with du = qk^T dY + tril(dO v^T)^T rc (u's gradient) and dE = k gK + v gV (E's),
   d a_i = p dp + dscores scores - (du + C_{n-1} dE) u (a_i = sum_{l <= i} log alpha_l), the last token's
   plus A_{n-1} (K . gK + V . gV) + sum_j dE_j E_j; then d log alpha_l = sum_{i >= l} d a_i
   - (du + C_{n-1} dE)_l alpha_l / C_l (u_l's own dependence through w_l); the carried gradients become
   A_{n-1} g + the chunk-start states' own (s q^T dX, dO^T r). */
static inline __attribute__((always_inline)) void backward_row_tiles(
        const int NB, int64_t r, int64_t heads, int64_t T, int64_t d, int64_t span, int bf16, const void *q,
        const Strides *sq, const void *k, const Strides *sk, const void *v, const Strides *sv, const void *gate,
        const Strides *sg, const Options *opt, const float *scores_kept, const float *checkpoints,
        const float *reads_kept, const float *rstd_kept, const void *d_out, const Strides *sdo,
        const float *dK_final, const float *dV_final, void *dq,
        const Strides *sdq, void *dk, const Strides *sdk, void *dv, const Strides *sdv, void *d_gate,
        const Strides *sdg, float *d_norm_weight, float *dK0, float *dV0, const Workspace *ws, const Chunk *w) {
    const int64_t S = NB * 16, dS = d * S, spans = (T + span - 1) / span, L = w->ld;
    const float scale = opt->q_scale;
    Options unscaled = *opt;
    unscaled.q_scale = 1.0f;
    const float *starts = checkpoints + r * spans * 2 * dS;
    float *gK = ws->K, *gV = ws->V;
    slots_to_state(dK_final + r * dS, d, S, d, gK);
    slots_to_state(dV_final + r * dS, d, S, d, gV);
    for (int64_t c = spans - 1; c >= 0; c--) {
        const int64_t t0 = c * span, n = t0 + span < T ? span : T - t0;
        const float *K = starts + c * 2 * dS, *V = K + dS, *p = ws->z, *dO = ws->o;
        const float *scores = scores_kept + (r * T + t0) * S; /* n x S */
        const int norm = opt->norm_weight != NULL;
        load_span(NB, ws, r, t0, n, heads, T, d, bf16, gate, sg, &unscaled, q, sq, k, sk, v, sv, 0, -span);
        const Inputs in = {input_rows(q, sq, heads, r, t0), input_rows(k, sk, heads, r, t0),
                           input_rows(v, sv, heads, r, t0)};
        chunk_decays(NB, ws, w, n);
        chunk_qk(&in, w, n, d, scale);
        chunk_reads(NB, ws, &in, w, scores, S, V, n, d, 0);
        load_read_grads(ws, r, t0, n, heads, T, d, bf16, opt, norm ? reads_kept + (r * T + t0) * d : NULL, d,
                        norm ? rstd_kept + r * T + t0 : NULL, d_out, sdo, d_norm_weight, -span);

        product(&w->packs, n, n, d, rows_of(dO, d), cols(in.v), w->d_mix, L, 0, ONE);
        lower_triangle(w->d_mix, n, L);
        product(&w->packs, n, S, d, rows_of(dO, d), rows_of(V, S), w->dp, L, 0, SPLIT_B);
        product(&w->packs, n, S, n, rows_of(w->d_mix, L), rows_of(w->u, L), w->dr, L, 0, SPLIT_BOTH);
        for (int64_t i = 0; i < n; i++) { /* dp, and the softmax's backward */
            v16 dpb[MAX_BLOCKS], pdp[MAX_BLOCKS], lanes = LOAD(p) * 0.0f;
            for (int b = 0; b < NB; b++) {
                const int64_t at = i * L + b * 16;
                dpb[b] = LOAD(w->A + at) * LOAD(w->dp + at) + LOAD(w->C + at) * LOAD(w->dr + at);
                pdp[b] = LOAD(p + i * S + b * 16) * dpb[b];
                lanes += pdp[b];
            }
            const float total = hsum(lanes);
            for (int b = 0; b < NB; b++) {
                const int64_t at = i * L + b * 16;
                const v16 dsc = pdp[b] - LOAD(p + i * S + b * 16) * total;
                STORE(w->pdp + at, pdp[b]);
                STORE(w->dsc + at, dsc);
                STORE(w->dX + at, dsc * LOAD(w->A + at));
                STORE(w->dY + at, dsc * LOAD(w->C + at));
            }
        }
        product(&w->packs, n, n, S, rows_of(w->dY, L), cols_of(w->u, L), w->d_qk, L, 0, ONE);
        lower_triangle(w->d_qk, n, L);
        product(&w->packs, n, d, n, rows_of(w->d_qk, L), in.k, w->dq, L, 0, ONE);
        product(&w->packs, n, d, S, rows_of(w->dX, L), cols_of(K, S), w->dq, L, 1, ONE);
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j <= i; j++) w->d_qk[i * L + j] *= scale;
        product(&w->packs, n, d, n, cols_of(w->d_qk, L), in.q, w->dk, L, 0, ONE);
        product(&w->packs, n, d, S, rows_of(w->E, L), cols_of(gK, S), w->dk, L, 1, ONE);
        product(&w->packs, n, d, n, cols_of(w->mix, L), rows_of(dO, d), w->dv, L, 0, ONE);
        product(&w->packs, n, d, S, rows_of(w->E, L), cols_of(gV, S), w->dv, L, 1, ONE);
        product(&w->packs, n, S, n, cols_of(w->qk, L), rows_of(w->dY, L), w->du, L, 0, SPLIT_BOTH);
        product(&w->packs, n, S, n, cols_of(w->d_mix, L), rows_of(w->rc, L), w->du, L, 1, SPLIT_BOTH);
        product(&w->packs, n, S, d, in.k, rows_of(gK, S), w->dE, L, 0, ONE);
        product(&w->packs, n, S, d, in.v, rows_of(gV, S), w->dE, L, 1, ONE);
        for (int64_t i = 0; i < n; i++) {
            memcpy(ws->dq + i * d, w->dq + i * L, sizeof(float) * d);
            memcpy(ws->dk + i * d, w->dk + i * L, sizeof(float) * d);
            memcpy(ws->dv + i * d, w->dv + i * L, sizeof(float) * d);
        }
        for (int b = 0; b < NB; b++) { /* the gates, 16 slots at a time */
            const int64_t s = b * 16;
            v16 carried = LOAD(gK + s) * 0.0f, from_E = carried, sum = carried;
            for (int64_t j = 0; j < d; j++)
                carried += LOAD(K + j * S + s) * LOAD(gK + j * S + s) + LOAD(V + j * S + s) * LOAD(gV + j * S + s);
            const v16 C_last = LOAD(w->C + (n - 1) * L + s);
            for (int64_t j = 0; j < n; j++) {
                const int64_t at = j * L + s;
                from_E += LOAD(w->dE + at) * LOAD(w->E + at);
                STORE(w->du + at, LOAD(w->du + at) + C_last * LOAD(w->dE + at)); /* all of u's gradient */
            }
            for (int64_t i = n - 1; i >= 0; i--) {
                const int64_t at = i * L + s;
                v16 da = LOAD(w->pdp + at) + LOAD(w->dsc + at) * LOAD(scores + i * S + s) - LOAD(w->du + at) * LOAD(w->u + at);
                if (i == n - 1) da += LOAD(w->A + at) * carried + from_E;
                sum += da;
                STORE(ws->dalpha + i * S + s, sum - LOAD(w->du + at) * LOAD(ws->a + i * S + s) / LOAD(w->C + at));
            }
        }
        product(&w->packs, d, S, n, cols(in.q), rows_of(w->dX, L), w->gK, L, 0, SPLIT_B);
        product(&w->packs, d, S, n, cols_of(dO, d), rows_of(w->r, L), w->gV, L, 0, SPLIT_B);
        for (int64_t j = 0; j < d; j++)
            for (int b = 0; b < NB; b++) {
                const v16 decay = LOAD(w->A + (n - 1) * L + b * 16);
                STORE(gK + j * S + b * 16, decay * LOAD(gK + j * S + b * 16) + scale * LOAD(w->gK + j * L + b * 16));
                STORE(gV + j * S + b * 16, decay * LOAD(gV + j * S + b * 16) + LOAD(w->gV + j * L + b * 16));
            }
        store_grads(NB, ws, r, t0, n, heads, T, d, bf16, opt, gate, sg, dq, sdq, dk, sdk, dv, sdv, d_gate, sdg, -span);
    }
    state_to_slots(gK, S, d, dK0 + r * dS);
    state_to_slots(gV, S, d, dV0 + r * dS);
}

/* The entry points' loop over rows as FOR_EACH_ROW's, each thread with the tiles configured and a
   chunk's arrays */
#define FOR_EACH_ROW_TILES(CALL)                                                                       \
    if (S % 16 != 0 || S < 16 || S > 16 * MAX_BLOCKS || d > TILE_MAX || span > CHUNK || !bf16) return -1; \
    const int NB = (int)(S / 16);                                                                      \
    const int64_t L = round_up(d > S ? d : S, 32);                                                     \
    _Pragma("omp parallel num_threads(threads)") {                                                     \
        FLUSH_DENORMALS                                                                                \
        configure_tiles();                                                                             \
        const int thread = omp_get_thread_num();                                                       \
        float *buf = aligned_alloc(64, sizeof(float) * ((workspace_floats(span, d, S) + 15) / 16 * 16)); \
        float *floats = aligned_alloc(64, sizeof(float) * chunk_floats(L));                            \
        uint16_t *halves = aligned_alloc(64, sizeof(uint16_t) * chunk_halves());                       \
        memset(floats, 0, sizeof(float) * chunk_floats(L));                                            \
        const Workspace ws = workspace(buf, span, d, S);                                            \
        const Chunk chunk = chunk_work(floats, halves, L);                                             \
        (void)thread;                                                                                  \
        _Pragma("omp for schedule(static)")                                                            \
        for (int64_t r = 0; r < rows; r++) BY_BLOCKS(NB, CALL)                                         \
        free(halves);                                                                                  \
        free(floats);                                                                                  \
        free(buf);                                                                                     \
        _tile_release();                                                                               \
        RESTORE_DENORMALS                                                                              \
    }                                                                                                  \
    return 0;

/* kv_memory_forward's contract for bf16 q, k, v (the `bf16` flag set) and spans of at most CHUNK tokens,
   keeping the scores (before the softmax) in place of p */
int kv_memory_forward_tiles(int64_t rows, int64_t heads, int64_t T, int64_t d, int64_t S, int64_t span, int bf16,
                            const void *q, Strides sq, const void *k, Strides sk, const void *v, Strides sv,
                            const void *gate, Strides sg, Options opt, const float *K0, Strides sK0, const float *V0,
                            Strides sV0, void *out, Strides so, float *scores_kept, float *checkpoints,
                            float *reads_kept, float *rstd_kept, float *K_final, float *V_final, int threads) {
#define FORWARD_TILES(N) forward_row_tiles(N, r, heads, T, d, span, bf16, q, &sq, k, &sk, v, &sv, gate, &sg, &opt, \
                                           K0, &sK0, V0, &sV0, out, &so, scores_kept, checkpoints, reads_kept, \
                                           rstd_kept, K_final, V_final, &ws, &chunk)
    FOR_EACH_ROW_TILES(FORWARD_TILES)
}

/* kv_memory_backward's contract, with the scores the tiles' forward kept in place of p */
int kv_memory_backward_tiles(int64_t rows, int64_t heads, int64_t T, int64_t d, int64_t S, int64_t span, int bf16,
                             const void *q, Strides sq, const void *k, Strides sk, const void *v, Strides sv,
                             const void *gate, Strides sg, Options opt, const float *scores_kept,
                             const float *checkpoints, const float *reads_kept, const float *rstd_kept,
                             const void *d_out, Strides sdo, const float *dK_final,
                             const float *dV_final, void *dq, Strides sdq, void *dk, Strides sdk, void *dv,
                             Strides sdv, void *d_gate, Strides sdg, float *d_norm_weight, float *dK0, float *dV0,
                             int threads) {
#define BACKWARD_TILES(N) backward_row_tiles(N, r, heads, T, d, span, bf16, q, &sq, k, &sk, v, &sv, gate, &sg, &opt, \
                                             scores_kept, checkpoints, reads_kept, rstd_kept, d_out, &sdo, \
                                             dK_final, dV_final, dq, &sdq, dk, &sdk, \
                                             dv, &sdv, d_gate, &sdg, d_norm_weight ? d_norm_weight + thread * d : NULL, \
                                             dK0, dV0, &ws, &chunk)
    FOR_EACH_ROW_TILES(BACKWARD_TILES)
}
#else
int kv_memory_tiles_ready(void) { return 0; }
#endif
