/* kdstore._native: the reader's fused decode kernel (optional; kdstore.native falls back to numpy).
 *
 * One pass per position over its stored codes: gaps -> cumulative sum (the stored index),
 * rank -> id (the store's index order), code -> probability (a lookup table), joint
 * renormalisation of the kept probabilities with the tail mass, written straight to the
 * caller's output layout (flat [E] entries, or padded [S, T, K] slots), together with a
 * training batch's per-position columns (ids, next-token labels, masks, counts). The numpy
 * paths (kdstore.store.Store.decode_raw, SoftLabelDataset.collate) are the reference;
 * tests/test_native.py holds the two equal.
 *
 * Why C: the numpy path makes seven passes over every entry (astype, cumsum, take, table
 * lookup, sum, scale, gather/scatter) plus ~20 per-position array operations per batch, ~12 ns
 * per kept entry, against ~13 ns for Parquet to
 * decode the same entry (bench/reader_bench.py). This kernel takes ~1.1 ns at k = 32, batch
 * columns and padding included (~1.5 ns with the Python of a batch around it).
 *
 * Only the buffer protocol is used (no numpy headers): the wrapper in kdstore/native.py
 * checks dtypes and contiguity; this file checks every index it follows against the buffer
 * it indexes, so a corrupt shard or a wrong argument raises instead of reading out of bounds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__) && defined(__x86_64__)
#include <emmintrin.h>
/* Streaming (non-temporal) stores for the per-entry outputs (12 of the 15 bytes per kept entry
 * the kernel moves): a batch's [S, T, K] index and probability arrays (~1.5 MB at 16 rows x 256
 * positions x k = 32) are written once and not read back by the kernel, and while shard reads
 * run on the other core they are no longer in cache when the next batch reuses the memory, so
 * plain stores first read every line back from memory. Measured on batches written to
 * memory not in cache: 1.64 -> 1.27 ns per kept entry (batches reusing cached memory: no
 * change); outputs are bit-identical. Other targets use plain stores. */
#define ST_I64(p, v) _mm_stream_si64((long long *)(p), (long long)(v))
#define NT_FENCE() _mm_sfence()
#define HAVE_NT 1
#else
#define ST_I64(p, v) (*(p) = (v))
#define NT_FENCE() ((void)0)
#define HAVE_NT 0
#endif

/* Status codes, mirrored in kdstore/native.py. */
enum { OK = 0, DUP = 1, RANGE = 2, CODE = 3, VOCAB = 4 };

typedef struct {
    /* source: one shard's undecoded codes */
    const void *gaps; int gsz; Py_ssize_t n_gaps;
    const void *pcodes; int psz;
    const void *tcodes; int tsz; Py_ssize_t n_pos_src;
    const void *counts; int csz; int64_t fixed_k;  /* counts == NULL: fixed_k per position */
    const int64_t *pos_ent;                          /* first entry of each source position (variable k) */
    const int64_t *tokens; Py_ssize_t n_tokens;      /* teacher ids, or NULL */
    /* rows */
    const int64_t *row_pos, *row_len, *row_out, *row_ctx, *row_ent, *row_pad; Py_ssize_t n_rows;
    int64_t k_out;                                   /* padded slots per position; 0: flat output (row_ent) */
    /* tables */
    const float *ptable; Py_ssize_t n_ptable;
    const float *ttable; Py_ssize_t n_ttable;
    const uint32_t *order; int64_t vocab;  /* rank -> id; uint32 (the format's id width): half the cache lines of int64 */
    /* outputs */
    int64_t *out_idx; float *out_probs; Py_ssize_t n_out_ent;
    float *out_tail; Py_ssize_t n_out_pos;
    int64_t *out_counts, *out_ids, *out_labels; uint8_t *out_mask, *out_kd_mask;
} Job;

static inline uint32_t rd(const void *b, int sz, Py_ssize_t i) {
    switch (sz) {
    case 1: return ((const uint8_t *)b)[i];
    case 2: return ((const uint16_t *)b)[i];
    default: return ((const uint32_t *)b)[i];
    }
}

/* The loop over rows and their positions, specialised on the code widths (GT: gaps, PT:
 * probability codes) so that the per-entry loops have no width switch. Per position: its
 * entries (cumulative gaps, rank -> id, code -> probability, renormalised with the tail) and,
 * when asked for, the per-position columns of a training batch (ids, next-token label,
 * masks, counts); with row_pad, also the padding (slots past a position's count, positions
 * after a row), so the caller need not zero-fill. Returns a status; *bad gets the
 * offending value.
 *
 * Shape of the per-entry work (measured with perf on k = 32 batches, 1.3 -> 0.6 ns per entry):
 * probabilities are written once, already scaled (the kept mass is summed in a first pass
 * over the codes): writing them unscaled and scaling in place made the compiler reload
 * 16-byte vectors over four just-written 4-byte stores, a store-forwarding stall that took
 * 40 % of the kernel. The four partial sums are named locals (an indexed array of them was
 * kept on the stack, one store-reload chain per entry). */
/* Positions with up to TMP kept entries (every top-k store up to k = 256) scale their
 * probabilities from a local copy: the scaling pass is then a vectorised multiply instead of
 * a second table lookup per entry (kernel 1.24 -> 1.12 ns per entry at k = 32). */
#define TMP 256
#if HAVE_NT
#include <xmmintrin.h>
/* dp[e] = tmp[e] * scale for e = *e0 .. (k rounded down to 4), 16-byte streaming stores
 * (dp 16-byte aligned); leaves *e0 at the first entry not written. */
#define STREAM_SCALED(dp, tmp, scale, k, e0)                                                    \
    do {                                                                                        \
        __m128 vs_ = _mm_set1_ps(scale);                                                        \
        for (; (e0) + 4 <= (k); (e0) += 4)                                                      \
            _mm_stream_ps((dp) + (e0), _mm_mul_ps(_mm_loadu_ps((tmp) + (e0)), vs_));            \
    } while (0)
#else
#define STREAM_SCALED(dp, tmp, scale, k, e0) ((void)0)
#endif
#define DEFINE_KERNEL(NAME, GT, PT)                                                             \
static int NAME(const Job *j, int64_t *bad) {                                                   \
    /* fields in locals, so that the output stores (int64/float), which may alias the job's \
     * fields, cannot force reloads */                                                          \
    const GT *gaps = (const GT *)j->gaps;                                                       \
    const PT *pc = (const PT *)j->pcodes;                                                       \
    const float *ptable = j->ptable, *ttable = j->ttable;                                       \
    const Py_ssize_t n_ptable = j->n_ptable, n_ttable = j->n_ttable;                            \
    /* a table with an entry for every code of the width needs no per-entry check */           \
    const int check_codes = n_ptable < ((Py_ssize_t)1 << (8 * sizeof(PT)));                     \
    const uint32_t *order = j->order;                                                           \
    const int64_t *pos_ent = j->pos_ent, *tokens = j->tokens;                                   \
    const int64_t *row_pad = j->row_pad;                                                        \
    const int64_t fixed_k = j->fixed_k, k_out = j->k_out, vocab = j->vocab;                     \
    const void *counts = j->counts;                                                             \
    int64_t *const out_idx = j->out_idx, *const out_counts = j->out_counts;                     \
    int64_t *const out_ids = j->out_ids, *const out_labels = j->out_labels;                     \
    float *const out_probs = j->out_probs, *const out_tail = j->out_tail;                       \
    uint8_t *const out_mask = j->out_mask, *const out_kd_mask = j->out_kd_mask;                 \
    const void *tcodes = j->tcodes;                                                             \
    const int csz = j->csz, tsz = j->tsz;                                                       \
    const Py_ssize_t n_gaps = j->n_gaps, n_out_ent = j->n_out_ent;                              \
    float tmp[TMP]; /* one position's probabilities, unscaled (positions of up to TMP entries) */ \
    for (Py_ssize_t r = 0; r < j->n_rows; r++) {                                                \
        int64_t p0 = j->row_pos[r], n = j->row_len[r], q0 = j->row_out[r];                      \
        int64_t ctx = j->row_ctx ? j->row_ctx[r] : 0, eo = j->row_ent ? j->row_ent[r] : 0;      \
        int64_t pad = row_pad ? row_pad[r] : 0;                                                 \
        if (n < 0 || p0 < 0 || p0 + n > j->n_pos_src || q0 < 0 || pad < 0                       \
            || q0 + n + pad > j->n_out_pos || (pad && (q0 + n + pad) * k_out > n_out_ent)       \
            || (tokens && p0 + n > j->n_tokens)) { *bad = r; return RANGE; }                 \
        for (int64_t t = 0; t < n; t++) {                                                       \
            int64_t sp = p0 + t, q = q0 + t;                                                    \
            int64_t k = counts ? (int64_t)rd(counts, csz, sp) : fixed_k;            \
            int64_t s = counts ? pos_ent[sp] : sp * fixed_k;                           \
            int64_t o = k_out ? q * k_out : eo;                                           \
            if (k < 0 || s < 0 || s + k > n_gaps || o < 0 || o + k > n_out_ent || (k_out && k > k_out)) { \
                *bad = r; return RANGE;                                                         \
            }                                                                                   \
            eo += k;                                                                            \
            const GT *g = gaps + s; const PT *c = pc + s;                                       \
            int64_t *di = out_idx + o; float *dp = out_probs + o;                         \
            if (k > 0) { /* indices: cumulative gaps, ascending within a position */           \
                int64_t acc = g[0];                                                             \
                if (order) {                                                                    \
                    /* order[acc] needs acc < vocab at every entry; the error reports the  \
                     * position's last (largest) index, as without an order */                 \
                    int64_t e = 0;                                                              \
                    for (;;) {                                                                  \
                        if (acc >= vocab) break;                                                \
                        ST_I64(di + e, (int64_t)order[acc]);                                        \
                        if (++e == k) break;                                                    \
                        if (g[e] == 0) { *bad = r; return DUP; }                                \
                        acc += g[e];                                                            \
                    }                                                                           \
                    if (e < k) {                                                                \
                        for (e++; e < k; e++) {                                                 \
                            if (g[e] == 0) { *bad = r; return DUP; }                            \
                            acc += g[e];                                                        \
                        }                                                                       \
                        *bad = acc; return VOCAB;                                               \
                    }                                                                           \
                } else {                                                                        \
                    ST_I64(di, acc);                                                            \
                    for (int64_t e = 1; e < k; e++) {                                           \
                        if (g[e] == 0) { *bad = r; return DUP; }                                \
                        acc += g[e];                                                            \
                        ST_I64(di + e, acc);                                                    \
                    }                                                                           \
                    if (acc >= vocab) { *bad = acc; return VOCAB; } /* the last is the largest */ \
                }                                                                               \
            }                                                                                   \
            if (check_codes)                                                                    \
                for (int64_t e = 0; e < k; e++)                                                 \
                    if ((Py_ssize_t)c[e] >= n_ptable) { *bad = c[e]; return CODE; }             \
            const int in_tmp = k <= TMP;                                                        \
            float scale = 1.0f;                                                                 \
            if (ttable) {                                                                    \
                /* kept mass in float64, four partial sums (entry e in sum e % 4); the        \
                 * probabilities looked up on the way are kept in tmp for the scaling pass */   \
                double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;                                  \
                int64_t e = 0;                                                                  \
                for (; e + 4 <= k; e += 4) {                                                    \
                    float v0 = ptable[c[e]], v1 = ptable[c[e + 1]];                             \
                    float v2 = ptable[c[e + 2]], v3 = ptable[c[e + 3]];                         \
                    if (in_tmp) { tmp[e] = v0; tmp[e + 1] = v1; tmp[e + 2] = v2; tmp[e + 3] = v3; } \
                    s0 += v0; s1 += v1; s2 += v2; s3 += v3;                                     \
                }                                                                               \
                if (e < k) { float v = ptable[c[e]]; if (in_tmp) tmp[e] = v; s0 += v; }         \
                if (e + 1 < k) { float v = ptable[c[e + 1]]; if (in_tmp) tmp[e + 1] = v; s1 += v; } \
                if (e + 2 < k) { float v = ptable[c[e + 2]]; if (in_tmp) tmp[e + 2] = v; s2 += v; } \
                double kept = (s0 + s1) + (s2 + s3);                                            \
                uint32_t tc = rd(tcodes, tsz, sp);                                        \
                if ((Py_ssize_t)tc >= n_ttable) { *bad = tc; return CODE; }                   \
                float tl = ttable[tc];                                                       \
                float total = (float)kept + tl;                                                 \
                scale = total > 0.0f ? 1.0f / (total > 1e-30f ? total : 1e-30f) : 1.0f;         \
                out_tail[q] = tl * scale;                                                    \
            } else {                                                                            \
                out_tail[q] = 0.0f;                                                          \
            }                                                                                   \
            if (ttable && in_tmp) { /* contiguous floats: a vectorised multiply */               \
                int64_t e = 0;                                                                  \
                if (HAVE_NT && ((uintptr_t)dp & 15) == 0) STREAM_SCALED(dp, tmp, scale, k, e);  \
                for (; e < k; e++) dp[e] = tmp[e] * scale;                                      \
            } else                                                                              \
                for (int64_t e = 0; e < k; e++) dp[e] = ptable[c[e]] * scale;                   \
            if (row_pad && k < k_out) {                                                         \
                memset(di + k, 0, (size_t)(k_out - k) * sizeof *di);                            \
                memset(dp + k, 0, (size_t)(k_out - k) * sizeof *dp);                            \
            }                                                                                   \
            if (out_counts) out_counts[q] = k;                                            \
            if (out_mask) out_mask[q] = 1;                                                \
            int has_kd = t >= ctx;                                                              \
            if (out_kd_mask) out_kd_mask[q] = (uint8_t)has_kd;                            \
            if (out_ids) out_ids[q] = tokens ? tokens[sp] : 0;                      \
            if (out_labels)                                                                  \
                out_labels[q] = (has_kd && t + 1 < n && tokens) ? tokens[sp + 1] : -100; \
        }                                                                                       \
        if (pad) { /* the padding after the row: what a zero-filled batch holds there */       \
            int64_t a = q0 + n;                                                                 \
            memset(out_idx + a * k_out, 0, (size_t)(pad * k_out) * sizeof *out_idx);           \
            memset(out_probs + a * k_out, 0, (size_t)(pad * k_out) * sizeof *out_probs);        \
            memset(out_tail + a, 0, (size_t)pad * sizeof *out_tail);                            \
            if (out_counts) memset(out_counts + a, 0, (size_t)pad * sizeof *out_counts);        \
            if (out_ids) memset(out_ids + a, 0, (size_t)pad * sizeof *out_ids);                 \
            if (out_mask) memset(out_mask + a, 0, (size_t)pad);                                 \
            if (out_kd_mask) memset(out_kd_mask + a, 0, (size_t)pad);                           \
            if (out_labels) for (int64_t x = 0; x < pad; x++) out_labels[a + x] = -100;         \
        }                                                                                       \
    }                                                                                           \
    return OK;                                                                                  \
}

DEFINE_KERNEL(k_1_1, uint8_t, uint8_t)
DEFINE_KERNEL(k_2_1, uint16_t, uint8_t)
DEFINE_KERNEL(k_4_1, uint32_t, uint8_t)
DEFINE_KERNEL(k_1_2, uint8_t, uint16_t)
DEFINE_KERNEL(k_2_2, uint16_t, uint16_t)
DEFINE_KERNEL(k_4_2, uint32_t, uint16_t)
DEFINE_KERNEL(k_1_4, uint8_t, uint32_t)
DEFINE_KERNEL(k_2_4, uint16_t, uint32_t)
DEFINE_KERNEL(k_4_4, uint32_t, uint32_t)

/* Arguments, in order: name, kind ('u': unsigned codes of 1, 2 or 4 bytes, 'q': int64,
 * 'U': uint32, 'f': float32, '?': bool), writable, may be None. Kinds are checked here from the buffer's
 * format, so the Python wrapper passes arrays through without per-call conversions. SRC_ARGS
 * are one source's (a shard's codes, given per source); ARGS the call's (rows, tables, outputs). */
typedef struct { const char *name; char kind; int writable, optional; } Arg;
static const Arg SRC_ARGS[] = {
    {"gaps", 'u', 0, 0}, {"pcodes", 'u', 0, 0}, {"tail_codes", 'u', 0, 0}, {"counts", 'u', 0, 1}, {"pos_ent", 'q', 0, 1},
    {"tokens", 'q', 0, 1},
};
static const Arg ARGS[] = {
    {"row_pos", 'q', 0, 0}, {"row_len", 'q', 0, 0}, {"row_out", 'q', 0, 0}, {"row_ctx", 'q', 0, 1},
    {"row_ent", 'q', 0, 1}, {"row_pad", 'q', 0, 1}, {"ptable", 'f', 0, 0}, {"ttable", 'f', 0, 1}, {"order", 'U', 0, 1},
    {"out_idx", 'q', 1, 0}, {"out_probs", 'f', 1, 0}, {"out_tail", 'f', 1, 0}, {"out_counts", 'q', 1, 1},
    {"out_ids", 'q', 1, 1}, {"out_labels", 'q', 1, 1}, {"out_mask", '?', 1, 1}, {"out_kd_mask", '?', 1, 1},
};

/* Does buffer b (native byte order) hold elements of `kind`? */
static int kind_ok(const Py_buffer *b, char kind) {
    const char *f = b->format ? b->format : "B";
    if (*f == '@' || *f == '=' || *f == '<') f++;  /* native or little-endian (the platforms built for) */
    if (f[0] == 0 || f[1] != 0) return 0;
    switch (kind) {
    case 'u': return strchr("BHILQ", f[0]) != NULL && (b->itemsize == 1 || b->itemsize == 2 || b->itemsize == 4);
    case 'q': return (f[0] == 'q' || f[0] == 'l') && b->itemsize == 8;
    case 'f': return f[0] == 'f' && b->itemsize == 4;
    case 'U': return (f[0] == 'I' || f[0] == 'L') && b->itemsize == 4;
    default: return f[0] == '?' && b->itemsize == 1;
    }
}

static const char *kind_name(char kind) {
    switch (kind) {
    case 'u': return "a C-contiguous unsigned 8/16/32-bit code array";
    case 'q': return "a C-contiguous int64 array";
    case 'f': return "a C-contiguous float32 array";
    case 'U': return "a C-contiguous uint32 array";
    default: return "a C-contiguous bool array";
    }
}

/* Acquires buffer *b of argument `a` from o (None allowed where optional: *have stays 0);
 * src >= 0 names the source in the error. Returns 0, or -1 with a TypeError set. */
static int get_arg(PyObject *o, const Arg *a, Py_ssize_t src, Py_buffer *b, int *have) {
    if (o == Py_None && a->optional) return 0;
    if (PyObject_GetBuffer(o, b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (a->writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Clear();
        if (src >= 0) PyErr_Format(PyExc_TypeError, "sources[%zd].%s: expected %s", src, a->name, kind_name(a->kind));
        else PyErr_Format(PyExc_TypeError, "%s: expected %s%s", a->name, kind_name(a->kind), a->writable ? " (writable)" : "");
        return -1;
    }
    *have = 1;
    if (!kind_ok(b, a->kind)) {
        if (src >= 0) PyErr_Format(PyExc_TypeError, "sources[%zd].%s: expected %s, got format '%s'", src, a->name,
                                   kind_name(a->kind), b->format ? b->format : "B");
        else PyErr_Format(PyExc_TypeError, "%s: expected %s, got format '%s'", a->name, kind_name(a->kind),
                          b->format ? b->format : "B");
        return -1;
    }
    return 0;
}

enum { NSRC = sizeof(SRC_ARGS) / sizeof(SRC_ARGS[0]), NARGS = sizeof(ARGS) / sizeof(ARGS[0]) };
enum { GAPS, PCODES, TCODES, COUNTS, POS_ENT, TOKENS };
enum { ROW_POS, ROW_LEN, ROW_OUT, ROW_CTX, ROW_ENT, ROW_PAD, PTABLE, TTABLE,
       ORDER, OUT_IDX, OUT_PROBS, OUT_TAIL, OUT_COUNTS, OUT_IDS, OUT_LABELS, OUT_MASK, OUT_KD_MASK };

/* decode_rows(sources, row_pos, ..., out_kd_mask, fixed_k, k_out, vocab) -> (status, bad, source):
 * sources is a sequence of (gaps, pcodes, tail_codes, counts, pos_ent, tokens, n_rows) tuples,
 * one per source (a shard of the batch); source i's rows are the next n_rows of the row
 * arrays, so one call decodes every shard of a batch into the shared outputs (a call's argument
 * checks cost ~1.2 us, and a batch of bench/reader_bench.py draws from ~4 shards). `source` is the
 * index of the source at fault when status is not OK. */
static PyObject *decode_rows(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *srcs, *o[NARGS];
    long long fixed_k, k_out, vocab;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOOOOOOLLL", &srcs, &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7],
                          &o[8], &o[9], &o[10], &o[11], &o[12], &o[13], &o[14], &o[15], &o[16], &fixed_k, &k_out, &vocab))
        return NULL;
    PyObject *seq = PySequence_Fast(srcs, "sources must be a sequence of (gaps, pcodes, tail_codes, counts, pos_ent, tokens, n_rows)");
    if (seq == NULL) return NULL;
    const Py_ssize_t n_src = PySequence_Fast_GET_SIZE(seq);
    Py_buffer b[NARGS], *sb = NULL;
    int have[NARGS] = {0}, *shave = NULL;
    Py_ssize_t *src_rows = NULL;
    PyObject *result = NULL;
    sb = PyMem_Calloc((size_t)(n_src ? n_src : 1) * NSRC, sizeof *sb);
    shave = PyMem_Calloc((size_t)(n_src ? n_src : 1) * NSRC, sizeof *shave);
    src_rows = PyMem_Calloc((size_t)(n_src ? n_src : 1), sizeof *src_rows);
    if (sb == NULL || shave == NULL || src_rows == NULL) { PyErr_NoMemory(); goto done; }
    for (int i = 0; i < NARGS; i++)
        if (get_arg(o[i], &ARGS[i], -1, &b[i], &have[i]) < 0) goto done;
#define N(i) (b[i].len / b[i].itemsize)
#define SB(s, i) sb[(s) * NSRC + (i)]
#define SN(s, i) (SB(s, i).len / SB(s, i).itemsize)
    Py_ssize_t total_rows = 0;
    for (Py_ssize_t s = 0; s < n_src; s++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, s);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != NSRC + 1) {
            PyErr_Format(PyExc_TypeError, "sources[%zd]: expected a (gaps, pcodes, tail_codes, counts, pos_ent, tokens, n_rows) tuple", s);
            goto done;
        }
        for (int i = 0; i < NSRC; i++)
            if (get_arg(PyTuple_GET_ITEM(t, i), &SRC_ARGS[i], s, &SB(s, i), &shave[s * NSRC + i]) < 0) goto done;
        src_rows[s] = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, NSRC));
        if (src_rows[s] == -1 && PyErr_Occurred()) goto done;
        const int *h = &shave[s * NSRC];
        if (src_rows[s] < 0 || SN(s, PCODES) != SN(s, GAPS)
            || (h[COUNTS] && (!h[POS_ENT] || SN(s, COUNTS) != SN(s, TCODES) || SN(s, POS_ENT) != SN(s, TCODES)))) {
            PyErr_Format(PyExc_ValueError, "sources[%zd]: gaps/pcodes must have one code per entry, counts/pos_ent one "
                         "value per position, n_rows >= 0", s);
            goto done;
        }
        total_rows += src_rows[s];
    }
    Py_ssize_t R = N(ROW_POS);
    if (N(ROW_LEN) != R || N(ROW_OUT) != R || (have[ROW_CTX] && N(ROW_CTX) != R) || (have[ROW_ENT] && N(ROW_ENT) != R)
        || (have[ROW_PAD] && N(ROW_PAD) != R) || total_rows != R) {
        PyErr_SetString(PyExc_ValueError, "row_pos, row_len, row_out (row_ctx, row_ent, row_pad) must have one value per row, "
                        "and the sources' n_rows must add up to the rows");
        goto done;
    }
    if (N(OUT_IDX) != N(OUT_PROBS) || (k_out == 0 && (!have[ROW_ENT] || have[ROW_PAD])) || k_out < 0) {
        PyErr_SetString(PyExc_ValueError, "out_idx/out_probs must have the same slots; flat output (k_out=0) needs row_ent and has no row_pad");
        goto done;
    }
    for (int i = OUT_COUNTS; i <= OUT_KD_MASK; i++)
        if (have[i] && N(i) != N(OUT_TAIL)) {
            PyErr_Format(PyExc_ValueError, "%s must have one value per output position, like out_tail", ARGS[i].name);
            goto done;
        }
    if (have[ORDER] && N(ORDER) < vocab) {
        PyErr_SetString(PyExc_ValueError, "order must have one id per rank (vocab values)");
        goto done;
    }
#define P(i, T) (have[i] ? (T)b[i].buf : NULL)
#define SP(i, T) (shave[s * NSRC + (i)] ? (T)SB(s, i).buf : NULL)
    const Job base = {
        .fixed_k = fixed_k, .k_out = k_out,
        .ptable = b[PTABLE].buf, .n_ptable = N(PTABLE),
        .ttable = P(TTABLE, const float *), .n_ttable = have[TTABLE] ? N(TTABLE) : 0,
        .order = P(ORDER, const uint32_t *), .vocab = vocab,
        .out_idx = b[OUT_IDX].buf, .out_probs = b[OUT_PROBS].buf, .n_out_ent = N(OUT_IDX),
        .out_tail = b[OUT_TAIL].buf, .n_out_pos = N(OUT_TAIL),
        .out_counts = P(OUT_COUNTS, int64_t *), .out_ids = P(OUT_IDS, int64_t *), .out_labels = P(OUT_LABELS, int64_t *),
        .out_mask = P(OUT_MASK, uint8_t *), .out_kd_mask = P(OUT_KD_MASK, uint8_t *),
    };
    const int64_t *row_pos = b[ROW_POS].buf, *row_len = b[ROW_LEN].buf, *row_out = b[ROW_OUT].buf;
    const int64_t *row_ctx = P(ROW_CTX, const int64_t *), *row_ent = P(ROW_ENT, const int64_t *);
    const int64_t *row_pad = P(ROW_PAD, const int64_t *);
    int64_t bad = 0;
    int status = OK;
    Py_ssize_t at_src = 0;
    int (*kernels[3][3])(const Job *, int64_t *) = {
        {k_1_1, k_1_2, k_1_4}, {k_2_1, k_2_2, k_2_4}, {k_4_1, k_4_2, k_4_4}};
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t at = 0;
    for (Py_ssize_t s = 0; s < n_src && status == OK; s++) {
        Job j = base;
        j.gaps = SB(s, GAPS).buf; j.gsz = (int)SB(s, GAPS).itemsize; j.n_gaps = SN(s, GAPS);
        j.pcodes = SB(s, PCODES).buf; j.psz = (int)SB(s, PCODES).itemsize;
        j.tcodes = SB(s, TCODES).buf; j.tsz = (int)SB(s, TCODES).itemsize; j.n_pos_src = SN(s, TCODES);
        j.counts = SP(COUNTS, const void *); j.csz = shave[s * NSRC + COUNTS] ? (int)SB(s, COUNTS).itemsize : 0;
        j.pos_ent = SP(POS_ENT, const int64_t *);
        j.tokens = SP(TOKENS, const int64_t *); j.n_tokens = shave[s * NSRC + TOKENS] ? SN(s, TOKENS) : 0;
        j.row_pos = row_pos + at; j.row_len = row_len + at; j.row_out = row_out + at;
        j.row_ctx = row_ctx ? row_ctx + at : NULL; j.row_ent = row_ent ? row_ent + at : NULL;
        j.row_pad = row_pad ? row_pad + at : NULL; j.n_rows = src_rows[s];
        int gi = j.gsz == 1 ? 0 : j.gsz == 2 ? 1 : 2, pi = j.psz == 1 ? 0 : j.psz == 2 ? 1 : 2;
        status = kernels[gi][pi](&j, &bad);
        if (status == RANGE || status == DUP) bad += at; /* a row: of the call, not of the source */
        at_src = s;
        at += src_rows[s];
    }
    NT_FENCE(); /* the streaming stores are visible to every thread before the call returns */
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("iLn", status, (long long)bad, at_src);
#undef SP
#undef P
#undef SN
#undef SB
#undef N
done:
    for (int i = 0; i < NARGS; i++)
        if (have[i]) PyBuffer_Release(&b[i]);
    if (sb != NULL && shave != NULL)
        for (Py_ssize_t i = 0; i < n_src * NSRC; i++)
            if (shave[i]) PyBuffer_Release(&sb[i]);
    PyMem_Free(sb);
    PyMem_Free(shave);
    PyMem_Free(src_rows);
    Py_DECREF(seq);
    return result;
}

/* token_ids(hashes u64[N], table u64[M * 2], bits, out i64[N]) -> (missing, first missing index):
 * Store.token_ids's lookup in its ordered linear-probing table of (hash, id) pairs: start at
 * the slot of the hash's top `bits` bits, step while the slot's hash is smaller; a hit is an
 * equal hash with an id >= 0. The table's last slot is empty (hash 2**64 - 1, checked here),
 * so every scan stops inside it. */
static PyObject *token_ids(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o[3];
    int bits;
    if (!PyArg_ParseTuple(args, "OOiO", &o[0], &o[1], &bits, &o[2])) return NULL;
    static const char *names[] = {"hashes", "table", "out"};
    Py_buffer b[3];
    int have = 0;
    PyObject *result = NULL;
    for (; have < 3; have++) {
        if (PyObject_GetBuffer(o[have], &b[have], PyBUF_C_CONTIGUOUS | (have == 2 ? PyBUF_WRITABLE : 0)) < 0) goto done;
        if (b[have].itemsize != 8) {
            PyErr_Format(PyExc_TypeError, "%s: element size %zd, expected 8", names[have], b[have].itemsize);
            have++;
            goto done;
        }
    }
    Py_ssize_t n = b[0].len / 8, m = b[1].len / 16;
    const uint64_t *h = b[0].buf, *tab = b[1].buf;
    if (bits < 1 || bits > 32 || m < ((Py_ssize_t)1 << bits) || b[1].len % 16 || b[2].len / 8 != n
        || tab[2 * (m - 1)] != UINT64_MAX) {
        PyErr_SetString(PyExc_ValueError, "token_ids: table must have at least 2**bits (hash, id) slots and end with an empty one; out one per query");
        goto done;
    }
    int64_t *out = b[2].buf;
    Py_ssize_t missing = 0, first = -1;
    const int shift = 64 - bits;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t x = h[i];
        Py_ssize_t slot = (Py_ssize_t)(x >> shift);
        while (tab[2 * slot] < x) slot++;  /* stops at the last slot at the latest (hash 2**64 - 1) */
        int64_t id = tab[2 * slot] == x ? (int64_t)tab[2 * slot + 1] : -1;
        if (id < 0) { id = -1; if (missing++ == 0) first = i; }
        out[i] = id;
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("nn", missing, first);
done:
    for (int i = 0; i < have; i++) PyBuffer_Release(&b[i]);
    return result;
}

static PyMethodDef methods[] = {
    {"token_ids", token_ids, METH_VARARGS, "token_ids(hashes, table, bits, out) -> (missing, first); see kdstore/native.py"},
    {"decode_rows", decode_rows, METH_VARARGS, "decode_rows(sources, ...) -> (status, bad, source); see kdstore/native.py"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "kdstore's fused decode kernel", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
