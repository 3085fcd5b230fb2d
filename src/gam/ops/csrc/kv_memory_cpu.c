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
 * tokens and the softmax p_t; the backward recomputes each span's states from
 * its checkpoint into a buffer and runs the recurrence in reverse, carrying the
 * gradient of the state (gam/ops/kv_memory.py, kv_memory_fused, has the maths).
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

static void load(const void *base, int bf16, int64_t at, int64_t n, float *out) {
    if (bf16) {
        const uint16_t *x = (const uint16_t *)base + at;
        for (int64_t j = 0; j < n; j++) out[j] = bf16_to_float(x[j]);
    } else {
        memcpy(out, (const float *)base + at, n * sizeof(float));
    }
}

static void store(void *base, int bf16, int64_t at, int64_t n, const float *x) {
    if (bf16) {
        uint16_t *out = (uint16_t *)base + at;
        for (int64_t j = 0; j < n; j++) out[j] = float_to_bf16(x[j]);
    } else {
        memcpy((float *)base + at, x, n * sizeof(float));
    }
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

static inline void store16(void *base, int bf16, int64_t at, v16 x) { /* bf16: as float_to_bf16, lane-wise */
    if (!bf16) {
        STORE((float *)base + at, x);
        return;
    }
    const u32x16 bits = (u32x16)x, nan = (u32x16)((bits & 0x7fffffffu) > 0x7f800000u);
    const u32x16 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    *(u16x16 *)((uint16_t *)base + at) = __builtin_convertvector((nan & ((bits >> 16) | 0x40u)) | (~nan & rounded), u16x16);
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

/* Per span of tokens, the state is swept in groups of `rows_per_group` rows j (a slice of the
   (d, S) matrix, contiguous): a group's slice stays in the L1 cache while the span's tokens pass
   over it, and the per-token sums over j (the scores, their gradients) are accumulated group by
   group in small per-span buffers. The span's gates, inputs and those buffers are fp32 arrays of
   (n, S) or (n, d) in a per-thread workspace. */
typedef struct {
    float *a, *w, *z, *dalpha; /* (span, S) */
    float *q, *k, *v, *o;      /* (span, d): inputs, and the reads or the read's gradient */
    float *dq, *dk, *dv;       /* (span, d) */
    float *states;             /* (span, rows_per_group, S): a group's states after each token */
    float *K, *V;              /* (d, S): the state, or its gradient */
} Workspace;

static Workspace workspace(float *buf, int64_t span, int64_t d, int64_t S, int64_t rows_per_group) {
    Workspace ws;
    ws.a = buf; ws.w = ws.a + span * S; ws.z = ws.w + span * S; ws.dalpha = ws.z + span * S;
    ws.q = ws.dalpha + span * S; ws.k = ws.q + span * d; ws.v = ws.k + span * d; ws.o = ws.v + span * d;
    ws.dq = ws.o + span * d; ws.dk = ws.dq + span * d; ws.dv = ws.dk + span * d;
    ws.states = ws.dv + span * d; ws.K = ws.states + span * rows_per_group * S; ws.V = ws.K + d * S;
    return ws;
}

static int64_t workspace_floats(int64_t span, int64_t d, int64_t S, int64_t rows_per_group) {
    return 4 * span * S + 7 * span * d + span * rows_per_group * S + 2 * d * S + 16;
}

/* The span's gates, and its inputs (q, k, v: any of them NULL to skip) as fp32 rows. */
static inline __attribute__((always_inline)) void load_span(
        const int NB, const Workspace *ws, int64_t r, int64_t t0, int64_t n, int64_t heads, int64_t T, int64_t d,
        int bf16, const void *gate, const Strides *sg, const Options *opt, const void *q, const Strides *sq,
        const void *k, const Strides *sk, const void *v, const Strides *sv) {
    const int64_t S = NB * 16;
    for (int64_t i = 0; i < n; i++) {
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
        if (q) {
            float *qi = ws->q + i * d;
            load(q, bf16, offset(sq, heads, r, t0 + i), d, qi);
            if (opt->q_scale != 1.0f)
                for (int64_t j = 0; j < d; j++) qi[j] *= opt->q_scale;
        }
        if (k) load(k, bf16, offset(sk, heads, r, t0 + i), d, ws->k + i * d);
        if (v) load(v, bf16, offset(sv, heads, r, t0 + i), d, ws->v + i * d);
    }
}

/* x[b] = the b-th 16 slots of src, b < NB */
static inline __attribute__((always_inline)) void load_slots(const int NB, const float *src, v16 *x) {
    for (int b = 0; b < NB; b++) x[b] = LOAD(src + b * 16);
}

/* The i-th token's per-slot vectors of a span: its gates alpha and w, and one more (n, S) buffer's row */
static inline __attribute__((always_inline)) void load_token(const int NB, const Workspace *ws, int64_t i,
                                                             const float *more, v16 *a, v16 *w, v16 *x) {
    const int64_t S = NB * 16;
    load_slots(NB, ws->a + i * S, a);
    load_slots(NB, ws->w + i * S, w);
    load_slots(NB, more + i * S, x);
}

/* The states of rows j0 .. j1 - 1 after each of the span's n tokens, from M (d, S) at its start,
   written with x (n, d): into ws->states (n, j1 - j0, S) */
static inline __attribute__((always_inline)) void group_states(const int NB, const Workspace *ws, const float *M,
                                                               int64_t j0, int64_t j1, int64_t n, int64_t d,
                                                               const float *x) {
    const int64_t S = NB * 16, rows = j1 - j0;
    for (int64_t i = 0; i < n; i++) {
        const float *prev = i == 0 ? M + j0 * S : ws->states + (i - 1) * rows * S;
        float *next = ws->states + i * rows * S;
        const float *a = ws->a + i * S, *w = ws->w + i * S, *xi = x + i * d + j0;
        for (int64_t j = 0; j < rows; j++)
            for (int b = 0; b < NB; b++) {
                const int64_t at = j * S + b * 16;
                STORE(next + at, LOAD(a + b * 16) * LOAD(prev + at) + LOAD(w + b * 16) * xi[j]);
            }
    }
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

/* The key writes and the scores: K_t = alpha K_{t-1} + w k^T, z_t += K_t q (row by row) */
static inline __attribute__((always_inline)) void key_writes(const int NB, const int TOKENS, const Workspace *ws,
                                                             float *K, int64_t i, int64_t j0, int64_t j1, int64_t d) {
    const int64_t S = NB * 16;
    v16 a[2][MAX_BLOCKS], w[2][MAX_BLOCKS], z[2][MAX_BLOCKS];
    for (int u = 0; u < TOKENS; u++) load_token(NB, ws, i + u, ws->z, a[u], w[u], z[u]);
    const float *qi = ws->q + i * d, *ki = ws->k + i * d;
    for (int64_t j = j0; j < j1; j++)
        for (int b = 0; b < NB; b++) {
            float *row = K + j * S + b * 16;
            v16 x = LOAD(row);
            for (int u = 0; u < TOKENS; u++) {
                x = a[u][b] * x + w[u][b] * ki[u * d + j];
                z[u][b] += x * qi[u * d + j];
            }
            STORE(row, x);
        }
    for (int u = 0; u < TOKENS; u++)
        for (int b = 0; b < NB; b++) STORE(ws->z + (i + u) * S + b * 16, z[u][b]);
}

/* The value writes and the reads: V_t = alpha V_{t-1} + w v^T, o_t = V_t^T p_t (p in ws->z) */
static inline __attribute__((always_inline)) void value_reads(const int NB, const int TOKENS, const Workspace *ws,
                                                              float *V, int64_t i, int64_t j0, int64_t j1, int64_t d) {
    const int64_t S = NB * 16;
    v16 a[2][MAX_BLOCKS], w[2][MAX_BLOCKS], p[2][MAX_BLOCKS];
    for (int u = 0; u < TOKENS; u++) load_token(NB, ws, i + u, ws->z, a[u], w[u], p[u]);
    const float *vi = ws->v + i * d;
    for (int64_t j = j0; j < j1; j++) {
        v16 acc[2] = {a[0][0] * 0.0f, a[0][0] * 0.0f};
        for (int b = 0; b < NB; b++) {
            float *row = V + j * S + b * 16;
            v16 x = LOAD(row);
            for (int u = 0; u < TOKENS; u++) {
                x = a[u][b] * x + w[u][b] * vi[u * d + j];
                acc[u] += x * p[u][b];
            }
            STORE(row, x);
        }
        for (int u = 0; u < TOKENS; u++) ws->o[(i + u) * d + j] = hsum(acc[u]);
    }
}

/* A forward sweep of the span's n tokens over the state M, group by group: the key writes and
   scores (VALUES = 0) or the value writes and reads (VALUES = 1), two tokens at a time where NB allows */
static inline __attribute__((always_inline)) void sweep(const int NB, const int VALUES, const Workspace *ws, float *M,
                                                        int64_t n, int64_t d, int64_t rows_per_group) {
    for (int64_t j0 = 0; j0 < d; j0 += rows_per_group) {
        const int64_t j1 = j0 + rows_per_group < d ? j0 + rows_per_group : d;
        int64_t i = 0;
        if (NB <= PAIR_BLOCKS)
            for (; i + 1 < n; i += 2) {
                if (VALUES)
                    value_reads(NB, 2, ws, M, i, j0, j1, d);
                else
                    key_writes(NB, 2, ws, M, i, j0, j1, d);
            }
        for (; i < n; i++) {
            if (VALUES)
                value_reads(NB, 1, ws, M, i, j0, j1, d);
            else
                key_writes(NB, 1, ws, M, i, j0, j1, d);
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
        load_span(NB, ws, r, t0, n, heads, T, d, bf16, gate, sg, opt, q, sq, k, sk, v, sv);
        memset(ws->z, 0, sizeof(float) * n * S);
        sweep(NB, 0, ws, K, n, d, rows_per_group); /* the key writes and the scores K_t q_t */
        for (int64_t i = 0; i < n; i++) {
            v16 z[MAX_BLOCKS];
            load_slots(NB, ws->z + i * S, z);
            softmax(NB, z);
            for (int b = 0; b < NB; b++) {
                STORE(ws->z + i * S + b * 16, z[b]);
                if (p_kept) STORE(p_kept + (r * T + t0 + i) * S + b * 16, z[b]);
            }
        }
        sweep(NB, 1, ws, V, n, d, rows_per_group); /* the value writes and the reads */
        for (int64_t i = 0; i < n; i++) {
            float *o = ws->o + i * d;
            if (opt->norm_weight) { /* o * rsqrt(mean(o^2) + eps) * weight; the raw read and rsqrt kept */
                float sum = 0.0f;
                _Pragma("omp simd reduction(+ : sum)") /* a vector sum: C may not reorder a float sum itself */
                for (int64_t j = 0; j < d; j++) sum += o[j] * o[j];
                const float rstd = 1.0f / sqrtf(sum / (float)d + opt->norm_eps);
                if (reads_kept) {
                    memcpy(reads_kept + (r * T + t0 + i) * d, o, sizeof(float) * d);
                    rstd_kept[r * T + t0 + i] = rstd;
                }
                for (int64_t j = 0; j < d; j++) o[j] *= rstd * opt->norm_weight[j];
            }
            store(out, bf16, offset(so, heads, r, t0 + i), d, o);
        }
    }
    state_to_slots(K, S, d, K_final + r * dS);
    state_to_slots(V, S, d, V_final + r * dS);
}

/* Through a write M_t = alpha M_{t-1} + w x^T with the gradient dM of M_t carried in, at one token
   and row j of the group: g = dM_t (plus what the read adds), dx_j = g . w,
   d log alpha += g . (M_t - x_j) (= alpha g . (M_{t-1} - x_j), as w = 1 - alpha: no M_{t-1}
   needed), and dM_{t-1} = alpha g. */
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
        const float *checkpoint = checkpoints + (r * spans + c) * 2 * dS;
        load_span(NB, ws, r, t0, n, heads, T, d, bf16, gate, sg, opt, q, sq, k, sk, v, sv);
        for (int64_t i = 0; i < n; i++) {
            float *g = ws->o + i * d;
            load(d_out, bf16, offset(sdo, heads, r, t0 + i), d, g);
            if (opt->norm_weight) { /* through the norm: with x = o rstd and h = g weight, do = rstd (h - x mean(x h)) */
                const float *o = reads_kept + (r * T + t0 + i) * d, rstd = rstd_kept[r * T + t0 + i];
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
        float *dp = ws->z; /* (n, S): the read's gradient of p, then of the scores */
        memset(dp, 0, sizeof(float) * n * S);
        memset(ws->dalpha, 0, sizeof(float) * n * S);
        /* o = V_t^T p: dp = V_t do, dV_t += p do^T; then through the value write */
        for (int64_t j0 = 0; j0 < d; j0 += rows_per_group) {
            const int64_t j1 = j0 + rows_per_group < d ? j0 + rows_per_group : d, rows = j1 - j0;
            group_states(NB, ws, checkpoint + dS, j0, j1, n, d, ws->v);
            for (int64_t i = n - 1; i >= 0; i--) {
                const float *Vt = ws->states + i * rows * S, *p = p_kept + (r * T + t0 + i) * S;
                const float *doi = ws->o + i * d, *vi = ws->v + i * d;
                v16 a[MAX_BLOCKS], w[MAX_BLOCKS], pb[MAX_BLOCKS], dpb[MAX_BLOCKS], da[MAX_BLOCKS];
                load_token(NB, ws, i, ws->dalpha, a, w, da);
                load_slots(NB, p, pb);
                load_slots(NB, dp + i * S, dpb);
                for (int64_t j = j0; j < j1; j++) {
                    const float doj = doi[j], vj = vi[j];
                    v16 acc = a[0] * 0.0f;
                    for (int b = 0; b < NB; b++) {
                        const v16 Vjb = LOAD(Vt + (j - j0) * S + b * 16);
                        float *grad = dV + j * S + b * 16;
                        dpb[b] += Vjb * doj;
                        const v16 g = LOAD(grad) + pb[b] * doj;
                        acc += w[b] * g;
                        da[b] += g * (Vjb - vj);
                        STORE(grad, a[b] * g);
                    }
                    ws->dv[i * d + j] = hsum(acc);
                }
                for (int b = 0; b < NB; b++) {
                    STORE(dp + i * S + b * 16, dpb[b]);
                    STORE(ws->dalpha + i * S + b * 16, da[b]);
                }
            }
        }
        for (int64_t i = 0; i < n; i++) { /* the softmax's backward: dz = p (dp - p . dp), into dp */
            const float *p = p_kept + (r * T + t0 + i) * S;
            v16 lanes = LOAD(p) * 0.0f;
            for (int b = 0; b < NB; b++) lanes += LOAD(p + b * 16) * LOAD(dp + i * S + b * 16);
            const float pdp = hsum(lanes);
            for (int b = 0; b < NB; b++)
                STORE(dp + i * S + b * 16, LOAD(p + b * 16) * (LOAD(dp + i * S + b * 16) - pdp));
        }
        /* z = K_t q: dq = K_t^T dz, dK_t += dz q^T; then through the key write */
        for (int64_t j0 = 0; j0 < d; j0 += rows_per_group) {
            const int64_t j1 = j0 + rows_per_group < d ? j0 + rows_per_group : d, rows = j1 - j0;
            group_states(NB, ws, checkpoint, j0, j1, n, d, ws->k);
            for (int64_t i = n - 1; i >= 0; i--) {
                const float *Kt = ws->states + i * rows * S, *qi = ws->q + i * d, *ki = ws->k + i * d;
                v16 a[MAX_BLOCKS], w[MAX_BLOCKS], dz[MAX_BLOCKS], da[MAX_BLOCKS];
                load_token(NB, ws, i, ws->dalpha, a, w, da);
                load_slots(NB, dp + i * S, dz);
                for (int64_t j = j0; j < j1; j++) {
                    const float qj = qi[j], kj = ki[j];
                    v16 acc_q = a[0] * 0.0f, acc_k = acc_q;
                    for (int b = 0; b < NB; b++) {
                        const v16 Kjb = LOAD(Kt + (j - j0) * S + b * 16);
                        float *grad = dK + j * S + b * 16;
                        acc_q += dz[b] * Kjb;
                        const v16 g = LOAD(grad) + dz[b] * qj;
                        acc_k += w[b] * g;
                        da[b] += g * (Kjb - kj);
                        STORE(grad, a[b] * g);
                    }
                    ws->dq[i * d + j] = hsum(acc_q);
                    ws->dk[i * d + j] = hsum(acc_k);
                }
                for (int b = 0; b < NB; b++) STORE(ws->dalpha + i * S + b * 16, da[b]);
            }
        }
        for (int64_t i = 0; i < n; i++) {
            const int64_t t = t0 + i;
            if (opt->q_scale != 1.0f)
                for (int64_t j = 0; j < d; j++) ws->dq[i * d + j] *= opt->q_scale;
            store(dq, bf16, offset(sdq, heads, r, t), d, ws->dq + i * d);
            store(dk, bf16, offset(sdk, heads, r, t), d, ws->dk + i * d);
            store(dv, bf16, offset(sdv, heads, r, t), d, ws->dv + i * d);
            /* none where the bound clamped the gate, as torch.clamp's gradient; for logits, times
               d logsigmoid(z) / dz = sigmoid(-z) = w */
            for (int b = 0; b < NB; b++) {
                const v16 g = load16(gate, opt->gate_bf16, offset(sg, heads, r, t) + b * 16), zero = g * 0.0f;
                const v16 grad = LOAD(ws->dalpha + i * S + b * 16);
                const v16 d_g = opt->gate_logits ? select(g >= zero + opt->gate_min, grad * LOAD(ws->w + i * S + b * 16), zero)
                                                 : select((g >= zero + opt->gate_min) & (g <= zero), grad, zero);
                store16(d_gate, opt->gate_bf16, offset(sdg, heads, r, t) + b * 16, d_g);
            }
        }
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
/* Rows of a group: GROUP_ROWS (the group's slice of the state, and of its gradient, stays in
   the L1 cache while the span's tokens pass; the backward's states of a group, a span of them,
   in L2) */
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
        float *buf = aligned_alloc(64, sizeof(float) * ((workspace_floats(span, d, S, per_group) + 15) / 16 * 16)); \
        const Workspace ws = workspace(buf, span, d, S, per_group);                                    \
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
