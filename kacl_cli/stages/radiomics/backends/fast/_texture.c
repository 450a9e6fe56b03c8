/*
 * kacl_cli.radiomics._texture: the counting pass of the fast radiomics backend, compiled.
 *
 * Why C: the numpy path (fast_texture.py) needs ~60 ns per canvas pixel in whole-array
 * passes (run finding on 4 layouts, two ndimage.label calls, shifted comparisons,
 * bincounts); these loops visit each ROI pixel a few times, with every matrix of a ROI
 * small enough for L1 (~13-20 ns per ROI pixel for all five classes). They produce the counts
 * the numpy path builds (the same integers), so the feature formulas stay in one place
 * (fast_texture.py) and the two paths are tested against each other and against
 * pyradiomics.
 *
 * Input: a canvas of raw uint8 pixels holding the ROIs as rectangles (fast_mosaic.pack),
 * and per ROI a 256-entry table from raw value to grey level (1..G; uint8 or uint16).
 * Each ROI is copied, discretised, into a scratch buffer with a ring of zeros, so no
 * neighbour read needs a bounds check.
 * Angles are the numpy path's: 0 = (0, 1), 1 = (1, -1), 2 = (1, 0), 3 = (1, 1), i.e. a
 * (first, second) pixel pair at flat offsets 1, W - 1, W, W + 1.
 *
 * Only the buffer protocol is used (no numpy headers), so the extension builds with the
 * plain setuptools of pip's isolated build environment.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define N_ANGLES 4
#define N_DEP 9 /* 0..8 neighbours */
#define MAX_WIDTH 65000 /* columns of a row are uint16, with the ring and a 16-wide spill */

/* A growable table of int64 rows (zones, GLRLM cells), handed to Python as bytes. */
typedef struct {
    int64_t *data;
    Py_ssize_t rows, cap;
    int width;
} Rows;

static int rows_reserve(Rows *t, Py_ssize_t more)
{
    if (t->rows + more <= t->cap) return 0;
    Py_ssize_t cap = t->cap ? t->cap : 1024;
    while (cap < t->rows + more) cap *= 2;
    int64_t *data = realloc(t->data, sizeof(int64_t) * (size_t)(cap * t->width));
    if (!data) return -1;
    t->data = data;
    t->cap = cap;
    return 0;
}

typedef struct {
    Py_ssize_t width;        /* canvas width */
    Py_ssize_t n;
    Py_ssize_t g1;           /* highest level + 1 */
    long alpha;
    const int64_t *ys, *xs, *hs, *ws;
    const void *tables;      /* n x 256 raw value -> level */
    double *glcm;            /* n x 4 x G x G, or NULL */
    const int64_t *rl_long;  /* n x 4: the longest possible run per (roi, angle) */
    int64_t *gldm;           /* n x g1 x 9, or NULL */
    int64_t *ngtdm;          /* n x g1 x 9 sums of |C L - T|, or NULL */
    int want_glrlm, want_zones;
    double *rl_sums;         /* n x 4 x 15 GLRLM sums (see glrlm_sums), or NULL */
    Rows glrlm;              /* (roi * 4 + angle, level, length, count), in that order */
    Rows zones;              /* (roi, level, size) */
    int failed;              /* 1: out of memory, 2: a run longer than rl_long */
} Job;

/* Per-call scratch, sized for the largest ROI of the call. */
typedef struct {
    void *pad;         /* (h + 3) x (w + 2) levels: the ROI with a ring of zeros, row 0 spare */
    int32_t *last;     /* per line of angles 1, 2, 3: where its current run started */
    uint16_t *at;      /* columns of a row where a pixel differs from its predecessor */
    int64_t *cm;       /* 4 x g1 x g1 co-occurrences, level 0 = outside (dropped) */
    int32_t *rl;       /* 4 x g1 x LS run counts by (level, length), level 0 dropped */
    int32_t *tot, *cnt, *dep; /* per pixel of a row: neighbour level sum, count, dependents */
    int64_t *dn;       /* g1 x 9 GLDM counts, then g1 x 9 NGTDM sums */
    int32_t *run_col, *run_end, *parent; /* zones: runs of a ROI and their union-find */
    int64_t *run_size;
    int32_t *run_level;
    double *pg, *pr;   /* GLRLM sums: counts per level, per run length */
    int64_t *pairs;    /* GLRLM sums: (level, level) GLCM pairs per level */
} Scratch;

static void scratch_free(Scratch *s)
{
    free(s->pad); free(s->last); free(s->at); free(s->cm); free(s->rl); free(s->tot);
    free(s->cnt); free(s->dep); free(s->dn); free(s->run_col); free(s->run_end);
    free(s->parent); free(s->run_size); free(s->run_level); free(s->pg); free(s->pr);
    free(s->pairs);
}

static int scratch_alloc(Scratch *s, const Job *job, size_t itemsize)
{
    Py_ssize_t hmax = 1, wmax = 1, amax = 1;
    for (Py_ssize_t r = 0; r < job->n; r++) {
        if (job->hs[r] > hmax) hmax = job->hs[r];
        if (job->ws[r] > wmax) wmax = job->ws[r];
        if (job->hs[r] * job->ws[r] > amax) amax = job->hs[r] * job->ws[r];
    }
    const size_t g1 = (size_t)job->g1, lines = (size_t)(hmax + wmax + 8);
    const size_t ls = (size_t)((hmax > wmax ? hmax : wmax) + 5);
    memset(s, 0, sizeof(*s));
    s->pad = calloc((size_t)(hmax + 3) * (size_t)(wmax + 2), itemsize);
    s->last = calloc(3 * lines, sizeof(int32_t));
    s->at = calloc((size_t)wmax + 3 + 16, sizeof(uint16_t)); /* + a 16-wide store's spill */
    s->cm = calloc(N_ANGLES * g1 * g1, sizeof(int64_t));
    s->rl = calloc(N_ANGLES * g1 * ls, sizeof(int32_t));
    s->tot = calloc((size_t)wmax + 2, sizeof(int32_t));
    s->cnt = calloc((size_t)wmax + 2, sizeof(int32_t));
    s->dep = calloc((size_t)wmax + 2, sizeof(int32_t));
    s->dn = calloc(2 * g1 * N_DEP, sizeof(int64_t));
    s->run_col = malloc(sizeof(int32_t) * (size_t)amax);
    s->run_end = malloc(sizeof(int32_t) * (size_t)amax);
    s->parent = malloc(sizeof(int32_t) * (size_t)amax);
    s->run_size = malloc(sizeof(int64_t) * (size_t)amax);
    s->run_level = malloc(sizeof(int32_t) * (size_t)amax);
    s->pg = calloc(g1, sizeof(double));
    s->pr = calloc(ls, sizeof(double));
    s->pairs = calloc(g1, sizeof(int64_t));
    if (!s->pg || !s->pr || !s->pairs || !s->pad || !s->last || !s->at || !s->cm || !s->rl || !s->tot || !s->cnt || !s->dep
        || !s->dn || !s->run_col || !s->run_end || !s->parent || !s->run_size
        || !s->run_level) {
        scratch_free(s);
        return -1;
    }
    return 0;
}

static inline int32_t find_root(int32_t *parent, int32_t k)
{
    while (parent[k] != k) {
        parent[k] = parent[parent[k]]; /* path halving */
        k = parent[k];
    }
    return k;
}

/* Compaction of change points: at[0..k) = the x in 0..n-1 where row[x] != prev[x].
 * Scalar: branch-free, one store per pixel. uint8 rows on SSE2 (every x86-64): 16 pixels per
 * step, one comparison, and per 8 pixels a table row of their positions (LUT) stored at
 * once and advanced by its popcount; `at` has room for 16 entries past n. */
static uint16_t CHANGE_LUT[256][8];
static uint8_t CHANGE_POP[256];

static void change_lut_init(void)
{
    for (int m = 0; m < 256; m++) {
        int k = 0;
        for (int b = 0; b < 8; b++)
            if (m & (1 << b)) CHANGE_LUT[m][k++] = (uint16_t)b;
        CHANGE_POP[m] = (uint8_t)k;
    }
}

#define DEFINE_CHANGES(SUFFIX, T)                                                              \
static inline int changes_##SUFFIX(const T *restrict row, const T *restrict prv, int n,        \
                                   uint16_t *restrict at)                                      \
{                                                                                              \
    int k = 0, x = 0;                                                                          \
    CHANGES_SIMD_##SUFFIX                                                                      \
    for (; x < n; x++) {                                                                       \
        at[k] = (uint16_t)x;                                                                   \
        k += row[x] != prv[x];                                                                 \
    }                                                                                          \
    return k;                                                                                  \
}

#if defined(__SSE2__)
#include <emmintrin.h>
#define CHANGES_SIMD_u8                                                                        \
    for (; x + 16 <= n; x += 16) {                                                             \
        const __m128i eq = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(row + x)),         \
                                          _mm_loadu_si128((const __m128i *)(prv + x)));        \
        const unsigned m = ~(unsigned)_mm_movemask_epi8(eq) & 0xFFFFu;                         \
        const unsigned lo = m & 0xFFu, hi = m >> 8;                                            \
        _mm_storeu_si128((__m128i *)(at + k), _mm_add_epi16(                                   \
            _mm_loadu_si128((const __m128i *)CHANGE_LUT[lo]), _mm_set1_epi16((short)x)));      \
        k += CHANGE_POP[lo];                                                                   \
        _mm_storeu_si128((__m128i *)(at + k), _mm_add_epi16(                                   \
            _mm_loadu_si128((const __m128i *)CHANGE_LUT[hi]),                                  \
            _mm_set1_epi16((short)(x + 8))));                                                  \
        k += CHANGE_POP[hi];                                                                   \
    }
#else
#define CHANGES_SIMD_u8
#endif
#define CHANGES_SIMD_u16

/*
 * GLCM and GLRLM of one ROI, from its runs. For each angle, cur runs over every pixel of
 * the ROI and of its ring below, left and right (rows 2..h+2 of `pad`) and prev = cur
 * minus the angle's offset (1, S - 1, S, S + 1). Work happens only where cur differs from
 * prev: per row, a compaction (changes_*) lists those columns, then each one closes the
 * run of prev's level that ends there, of length pos - last[line] (pos = x along rows, y
 * along the other angles): the GLRLM gets (level, length) and the GLCM the pair (prev,
 * cur); the run's length - 1 pairs (level, level) are added from the run counts after.
 * Lines enter the ROI from the zero ring, so each line's first change has an outside prev;
 * outside levels (0) go to the dropped row/column 0 (cell 0 for the GLRLM, whose outside
 * run lengths are meaningless), so no branch and no initialisation of `last` is needed.
 */
#define DEFINE_RUN_PASS(SUFFIX, T)                                                             \
static __attribute__((noinline)) void run_pass_##SUFFIX(                                       \
    const T *restrict B, int S, int h, int w, int g1, int LS, int64_t *restrict cm,            \
    int32_t *restrict rl, int32_t *restrict last, uint16_t *restrict at)                       \
{                                                                                              \
    const int n = w + 2, lines = h + w + 8;                                                    \
    for (int a = 0; a < N_ANGLES; a++) {                                                       \
        const int back = a == 0 ? 1 : a == 1 ? S - 1 : a == 2 ? S : S + 1;                     \
        int64_t *restrict ca = cm + a * g1 * g1;                                               \
        int32_t *restrict ra = rl + a * g1 * LS;                                               \
        int32_t *restrict la = last + (a == 0 ? 0 : (a - 1) * lines);                          \
        for (int y = 2; y <= h + 2; y++) {                                                     \
            const T *restrict row = B + y * S;                                                 \
            const T *restrict prv = row - back;                                                \
            const int k = changes_##SUFFIX(row, prv, n, at);                                   \
            /* line of (y, x): rows share one slot; else x (+ y, - y) */                       \
            int32_t *restrict ln = a == 0 ? la : a == 1 ? la + y : a == 2 ? la : la + h + 3 - y; \
            const int xs = a == 0, pos_y = a == 0 ? 0 : y;                                     \
            for (int j = 0; j < k; j++) {                                                      \
                const int x = at[j], cur = row[x], p = prv[x];                                 \
                const int li = xs ? 0 : x, pos = xs ? x : pos_y;                               \
                const int len = pos - ln[li];                                                  \
                ln[li] = pos;                                                                  \
                ra[p ? p * LS + len : 0]++;                                                    \
                ca[p * g1 + cur]++;                                                            \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
}

/* Per pixel of a row (columns 1..w): sum and count of its in-ROI 8-neighbours and the
 * number of them within alpha levels; plain loops over three rows, which vectorise. */
#define DEFINE_NEIGHBOURS(SUFFIX, T)                                                           \
static __attribute__((noinline)) void neighbours_##SUFFIX(                                     \
    const T *restrict u, const T *restrict m, const T *restrict d, Py_ssize_t w, long alpha,   \
    int32_t *restrict tot, int32_t *restrict cnt, int32_t *restrict dep)                       \
{                                                                                              \
    for (Py_ssize_t x = 1; x <= w; x++) {                                                      \
        const int32_t q0 = u[x - 1], q1 = u[x], q2 = u[x + 1], q3 = m[x - 1];                  \
        const int32_t q4 = m[x + 1], q5 = d[x - 1], q6 = d[x], q7 = d[x + 1];                  \
        tot[x] = q0 + q1 + q2 + q3 + q4 + q5 + q6 + q7;                                        \
        cnt[x] = (q0 != 0) + (q1 != 0) + (q2 != 0) + (q3 != 0) + (q4 != 0) + (q5 != 0)         \
                 + (q6 != 0) + (q7 != 0);                                                      \
    }                                                                                          \
    if (alpha == 0) {                                                                          \
        for (Py_ssize_t x = 1; x <= w; x++) {                                                  \
            const int32_t c = m[x];                                                            \
            dep[x] = (u[x - 1] == c) + (u[x] == c) + (u[x + 1] == c) + (m[x - 1] == c)         \
                     + (m[x + 1] == c) + (d[x - 1] == c) + (d[x] == c) + (d[x + 1] == c);      \
        }                                                                                      \
    } else {                                                                                   \
        const int32_t A = (int32_t)alpha;                                                      \
        for (Py_ssize_t x = 1; x <= w; x++) {                                                  \
            const int32_t c = m[x];                                                            \
            const int32_t q[8] = {u[x - 1], u[x], u[x + 1], m[x - 1], m[x + 1], d[x - 1],      \
                                  d[x], d[x + 1]};                                             \
            int32_t k = 0;                                                                     \
            for (int j = 0; j < 8; j++)                                                        \
                k += (q[j] != 0) & (q[j] - c <= A) & (c - q[j] <= A);                          \
            dep[x] = k;                                                                        \
        }                                                                                      \
    }                                                                                          \
}

/* GLDM and NGTDM counts of one ROI. The neighbour sums run in their own non-inlined
 * function: inlined here, gcc no longer vectorised them (measured 11 -> 6 ns per pixel). */
#define DEFINE_DN_PASS(SUFFIX, T)                                                              \
static __attribute__((noinline)) void dn_pass_##SUFFIX(                                        \
    const T *restrict B, int S, int h, int w, long alpha, int64_t *restrict dm,                \
    int64_t *restrict nm, int32_t *restrict tot, int32_t *restrict cnt, int32_t *restrict dep) \
{                                                                                              \
    for (int y = 2; y <= h + 1; y++) {                                                         \
        const T *restrict m = B + y * S;                                                       \
        neighbours_##SUFFIX(m - S, m, m + S, w, alpha, tot, cnt, dep);                         \
        for (int x = 1; x <= w; x++) {                                                         \
            const int c = m[x], k = c * N_DEP;                                                 \
            dm[k + dep[x]] += 1;                                                               \
            const int dev = c * cnt[x] - tot[x];                                               \
            nm[k + cnt[x]] += dev < 0 ? -dev : dev;                                            \
        }                                                                                      \
    }                                                                                          \
}

/*
 * GLSZM zones of one ROI: its horizontal runs (from the change points of each row), joined
 * by union-find to the equal-level runs of the row above that touch them (8-connectivity:
 * columns s - 1 .. e + 1). Appends (roi, level, size) per zone.
 */
#define DEFINE_ZONE_PASS(SUFFIX, T)                                                            \
static int zone_pass_##SUFFIX(const T *restrict B, int S, int h, int w, Py_ssize_t roi,        \
                              Scratch *sc, Rows *out)                                          \
{                                                                                              \
    int32_t *restrict col = sc->run_col, *restrict end = sc->run_end;                          \
    int32_t *restrict level = sc->run_level, *restrict parent = sc->parent;                    \
    int64_t *restrict size = sc->run_size;                                                     \
    int32_t n_runs = 0, prev_begin = 0, prev_end = 0;                                          \
    for (int y = 2; y <= h + 1; y++) {                                                         \
        const T *row = B + y * S;                                                              \
        const int32_t begin = n_runs;                                                          \
        /* run starts: 1 (after the zero ring), each change, and w + 1 closes the last */      \
        const int k_changes = changes_##SUFFIX(row, row - 1, w + 2, sc->at);                   \
        for (int j = 0; j + 1 < k_changes; j++) {                                              \
            const int x = sc->at[j];                                                           \
            col[n_runs] = x;                                                                   \
            end[n_runs] = sc->at[j + 1] - 1;                                                   \
            level[n_runs] = row[x];                                                            \
            parent[n_runs] = n_runs;                                                           \
            size[n_runs] = 0;                                                                  \
            n_runs++;                                                                          \
        }                                                                                      \
        int32_t j = prev_begin;                                                                \
        for (int32_t k = begin; k < n_runs; k++) {                                             \
            while (j < prev_end && end[j] < col[k] - 1) j++;                                   \
            for (int32_t q = j; q < prev_end && col[q] <= end[k] + 1; q++) {                   \
                if (level[q] != level[k]) continue;                                            \
                const int32_t a = find_root(parent, q), b = find_root(parent, k);              \
                if (a < b) parent[b] = a;                                                      \
                else if (b < a) parent[a] = b;                                                 \
            }                                                                                  \
        }                                                                                      \
        prev_begin = begin;                                                                    \
        prev_end = n_runs;                                                                     \
    }                                                                                          \
    Py_ssize_t n_zones = 0;                                                                    \
    for (int32_t k = 0; k < n_runs; k++) {                                                     \
        const int32_t root = find_root(parent, k);                                             \
        size[root] += end[k] - col[k] + 1;                                                     \
        n_zones += root == k;                                                                  \
    }                                                                                          \
    if (rows_reserve(out, n_zones) < 0) return -1;                                             \
    for (int32_t k = 0; k < n_runs; k++) {                                                     \
        if (parent[k] != k) continue;                                                          \
        int64_t *z = out->data + 3 * out->rows++;                                              \
        z[0] = roi;                                                                            \
        z[1] = level[k];                                                                       \
        z[2] = size[k];                                                                        \
    }                                                                                          \
    return 0;                                                                                  \
}

/*
 * The 15 GLRLM sums of one (roi, angle) (see glrlm_sums) straight from its dense run counts
 * rl[level * LS + length], visited in the order of the cells counts() lists (level, then
 * length, nonzero only), with glrlm_sums' arithmetic: the same values without building,
 * copying and re-reading ~360 cells per ROI (issue 18). pg (g1) and pr (>= longest) are
 * zero on entry and on return; nz_len, nz_count (>= the ROI's pixels) are scratch; pairs
 * (g1, or NULL) gets each level's (level, level) GLCM pairs, sum of count * (length - 1).
 * Returns -1 for a run longer than `longest`.
 */
static int glrlm_sums_dense(const int32_t *rl, Py_ssize_t g1, Py_ssize_t LS, int64_t longest,
                            double *pg, double *pr, int32_t *nz_len, int32_t *nz_count,
                            int64_t *pairs, double *o)
{
    const double eps = 2.220446049250313e-16; /* np.spacing(1) */
    double s[10] = {0};
    Py_ssize_t nz = 0;
    for (Py_ssize_t gl = 1; gl < g1; gl++) {
        const int32_t *row = rl + gl * LS;
        int64_t level_pairs = 0;
        for (Py_ssize_t k = 1; k < LS; k++) {
            if (!row[k]) continue;
            if (k > longest) return -1;
            nz_len[nz] = (int32_t)k;
            nz_count[nz++] = row[k];
            level_pairs += (int64_t)row[k] * (k - 1);
            const double c = (double)row[k], rf = (double)k, g2 = (double)(gl * gl);
            const double r2 = rf * rf, sr = c / r2, lr = c * r2;
            s[0] += c; s[1] += c * rf; s[2] += sr; s[3] += lr; s[4] += c / g2;
            s[5] += c * g2; s[6] += sr / g2; s[7] += sr * g2; s[8] += lr / g2; s[9] += lr * g2;
            pg[gl] += c;
            pr[k - 1] += c;
        }
        if (pairs) pairs[gl] = level_pairs;
    }
    const double nr = s[0] > 0 ? s[0] : 1.0, mu_r = s[1] / nr;
    double var = 0, ent = 0, gln = 0, rln = 0, mu = 0, glv = 0;
    for (Py_ssize_t j = 0; j < nz; j++) { /* the same cells, in the same order */
        const double c = (double)nz_count[j], dev = (double)nz_len[j] - mu_r, p = c / nr;
        var += c * dev * dev;
        ent += p * log2(p + eps);
    }
    for (Py_ssize_t g = 0; g < g1; g++) { gln += pg[g] * pg[g]; mu += pg[g] / nr * g; }
    for (Py_ssize_t g = 0; g < g1; g++) {
        const double d = g - mu;
        glv += pg[g] / nr * d * d;
        pg[g] = 0;
    }
    for (int64_t l = 0; l < longest; l++) { rln += pr[l] * pr[l]; pr[l] = 0; }
    memcpy(o, s, sizeof(s));
    o[10] = var; o[11] = ent; o[12] = gln; o[13] = rln; o[14] = glv;
    return 0;
}

/*
 * One implementation per level dtype. Per ROI:
 * 1. copy it, discretised by its table, into `pad` with a ring of zeros (plus a spare zero
 *    row on top), so every neighbour read below is in the buffer and is 0 outside the ROI;
 * 2. GLCM and GLRLM from the runs of each angle (run_pass);
 * 3. per row, neighbour sums/counts (vectorised), then the GLDM and NGTDM increments;
 * 4. GLSZM zones (zone_pass).
 */
#define DEFINE_KERNEL(SUFFIX, T)                                                               \
static void kernel_##SUFFIX(const uint8_t *raw, Job *job)                                      \
{                                                                                              \
    Scratch sc;                                                                                \
    if (scratch_alloc(&sc, job, sizeof(T)) < 0) { job->failed = 1; return; }                   \
    const Py_ssize_t W = job->width, g1 = job->g1, G = g1 - 1;                                 \
    const int do_runs = job->glcm != NULL || job->want_glrlm || job->rl_sums != NULL;          \
    const int do_dn = job->gldm != NULL || job->ngtdm != NULL;                                 \
    T *const B = (T *)sc.pad;                                                                  \
    for (Py_ssize_t r = 0; r < job->n && !job->failed; r++) {                                  \
        const Py_ssize_t h = job->hs[r], w = job->ws[r], S = w + 2;                            \
        const Py_ssize_t LS = (h > w ? h : w) + 5;                                             \
        const uint8_t *src = raw + job->ys[r] * W + job->xs[r];                                \
        const T *tab = (const T *)job->tables + r * 256;                                       \
        memset(B, 0, sizeof(T) * (size_t)((h + 3) * S));                                       \
        for (Py_ssize_t y = 0; y < h; y++) {                                                   \
            T *dst = B + (y + 2) * S + 1;                                                      \
            const uint8_t *line = src + y * W;                                                 \
            for (Py_ssize_t x = 0; x < w; x++) dst[x] = tab[line[x]];                          \
        }                                                                                      \
        if (do_runs) {                                                                         \
            memset(sc.cm, 0, sizeof(int64_t) * (size_t)(N_ANGLES * g1 * g1));                  \
            memset(sc.rl, 0, sizeof(int32_t) * (size_t)(N_ANGLES * g1 * LS));                  \
            run_pass_##SUFFIX(B, (int)S, (int)h, (int)w, (int)g1, (int)LS, sc.cm, sc.rl,       \
                              sc.last, sc.at);                                                 \
            /* GLRLM sums (and the GLCM's (level, level) pairs with them), else the pairs:   \
             * length - 1 per run, from the run counts */                                     \
            for (int a = 0; a < N_ANGLES && job->rl_sums; a++) {                               \
                if (glrlm_sums_dense(sc.rl + a * g1 * LS, g1, LS,                              \
                                     job->rl_long[r * N_ANGLES + a], sc.pg, sc.pr,             \
                                     sc.run_col, sc.run_end, sc.pairs,                         \
                                     job->rl_sums + (r * N_ANGLES + a) * 15) < 0)              \
                    job->failed = 2;                                                           \
                for (Py_ssize_t i = 1; i < g1 && job->glcm; i++)                               \
                    sc.cm[(a * g1 + i) * g1 + i] += sc.pairs[i];                               \
            }                                                                                  \
            if (job->glcm) {                                                                   \
                for (int a = 0; a < N_ANGLES && !job->rl_sums; a++)                            \
                    for (Py_ssize_t i = 1; i < g1; i++) {                                      \
                        const int32_t *rl = sc.rl + (a * g1 + i) * LS;                         \
                        int64_t pairs = 0;                                                     \
                        for (Py_ssize_t k = 2; k < LS; k++) pairs += (int64_t)rl[k] * (k - 1); \
                        sc.cm[(a * g1 + i) * g1 + i] += pairs;                                 \
                    }                                                                          \
                double *out = job->glcm + r * N_ANGLES * G * G;                                \
                for (int a = 0; a < N_ANGLES; a++)                                             \
                    for (Py_ssize_t i = 1; i < g1; i++)                                        \
                        for (Py_ssize_t j = 1; j < g1; j++)                                    \
                            out[(a * G + i - 1) * G + j - 1] =                                 \
                                (double)sc.cm[(a * g1 + i) * g1 + j];                          \
            }                                                                                  \
            for (int a = 0; a < N_ANGLES && job->want_glrlm; a++) {                            \
                const int64_t longest = job->rl_long[r * N_ANGLES + a];                        \
                const int32_t *rl = sc.rl + a * g1 * LS;                                       \
                for (Py_ssize_t i = 1; i < g1; i++) {                                          \
                    for (Py_ssize_t k = 1; k < LS; k++) {                                      \
                        const int32_t v = rl[i * LS + k];                                      \
                        if (!v) continue;                                                      \
                        if (k > longest) { job->failed = 2; break; }                           \
                        if (rows_reserve(&job->glrlm, 1) < 0) { job->failed = 1; break; }      \
                        int64_t *cell = job->glrlm.data + 4 * job->glrlm.rows++;               \
                        cell[0] = r * N_ANGLES + a;                                            \
                        cell[1] = i;                                                           \
                        cell[2] = k;                                                           \
                        cell[3] = v;                                                           \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        if (do_dn) {                                                                           \
            int64_t *const dm = sc.dn, *const nm = sc.dn + g1 * N_DEP;                         \
            memset(sc.dn, 0, sizeof(int64_t) * (size_t)(2 * g1 * N_DEP));                      \
            dn_pass_##SUFFIX(B, (int)S, (int)h, (int)w, job->alpha, dm, nm,                    \
                             sc.tot, sc.cnt, sc.dep);                                          \
            if (job->gldm)                                                                     \
                memcpy(job->gldm + r * g1 * N_DEP, dm, sizeof(int64_t) * (size_t)(g1 * N_DEP)); \
            if (job->ngtdm)                                                                    \
                memcpy(job->ngtdm + r * g1 * N_DEP, nm, sizeof(int64_t) * (size_t)(g1 * N_DEP)); \
        }                                                                                      \
        if (job->want_zones                                                                    \
            && zone_pass_##SUFFIX(B, (int)S, (int)h, (int)w, r, &sc, &job->zones) < 0)         \
            job->failed = 1;                                                                   \
    }                                                                                          \
    scratch_free(&sc);                                                                         \
}

#define DEFINE_ALL(SUFFIX, T)                                                                  \
    DEFINE_CHANGES(SUFFIX, T)                                                                  \
    DEFINE_RUN_PASS(SUFFIX, T)                                                                 \
    DEFINE_NEIGHBOURS(SUFFIX, T)                                                               \
    DEFINE_DN_PASS(SUFFIX, T)                                                                  \
    DEFINE_ZONE_PASS(SUFFIX, T)                                                                \
    DEFINE_KERNEL(SUFFIX, T)

DEFINE_ALL(u8, uint8_t)
DEFINE_ALL(u16, uint16_t)

/* A C-contiguous buffer argument, or None when `optional`. */
static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t min_bytes,
                      const char *name, int optional, int *held)
{
    *held = 0;
    if (obj == Py_None) {
        if (optional) return 0;
        PyErr_Format(PyExc_ValueError, "%s is required", name);
        return -1;
    }
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    *held = 1;
    if (view->len < min_bytes) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need %zd", name, view->len, min_bytes);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(place_doc,
"place(crops, canvas, ys, xs, hist)\n\n"
"Copy each 2D uint8 crop (rows contiguous) into the C-contiguous uint8 canvas at (ys[i],\n"
"xs[i]) and add its 256-bin histogram to hist[i] (int64 n x 256, zeroed).");

static PyObject *place(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *crops, *canvas_o, *ys_o, *xs_o, *hist_o;
    if (!PyArg_ParseTuple(args, "OOOOO", &crops, &canvas_o, &ys_o, &xs_o, &hist_o)) return NULL;
    PyObject *seq = PySequence_Fast(crops, "crops must be a sequence");
    if (!seq) return NULL;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Py_buffer canvas, ys, xs, hist;
    int hc = 0, hy = 0, hx = 0, hh = 0;
    PyObject *result = NULL;
    if (get_buffer(canvas_o, &canvas, 1, 0, "canvas", 0, &hc) < 0) goto done;
    if (canvas.ndim != 2 || canvas.itemsize != 1) {
        PyErr_SetString(PyExc_ValueError, "canvas must be a 2D uint8 array");
        goto done;
    }
    if (get_buffer(ys_o, &ys, 0, n * 8, "ys", 0, &hy) < 0) goto done;
    if (get_buffer(xs_o, &xs, 0, n * 8, "xs", 0, &hx) < 0) goto done;
    if (get_buffer(hist_o, &hist, 1, n * 256 * 8, "hist", 0, &hh) < 0) goto done;
    const Py_ssize_t H = canvas.shape[0], W = canvas.shape[1];
    uint8_t *dst = canvas.buf;
    int64_t *hs = hist.buf;
    const int64_t *yv = ys.buf, *xv = xs.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer crop;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &crop, PyBUF_STRIDED_RO) < 0)
            goto done;
        const Py_ssize_t h = crop.ndim == 2 ? crop.shape[0] : 0;
        const Py_ssize_t w = crop.ndim == 2 ? crop.shape[1] : 0;
        if (crop.ndim != 2 || crop.itemsize != 1 || crop.strides[1] != 1 || yv[i] < 0
            || xv[i] < 0 || yv[i] + h > H || xv[i] + w > W) {
            PyBuffer_Release(&crop);
            PyErr_Format(PyExc_ValueError,
                         "crop %zd must be 2D uint8 with contiguous rows, inside the canvas", i);
            goto done;
        }
        int64_t *hi = hs + i * 256;
        for (Py_ssize_t y = 0; y < h; y++) {
            const uint8_t *line = (const uint8_t *)crop.buf + y * crop.strides[0];
            memcpy(dst + (yv[i] + y) * W + xv[i], line, (size_t)w);
            for (Py_ssize_t x = 0; x < w; x++) hi[line[x]]++;
        }
        PyBuffer_Release(&crop);
    }
    result = Py_NewRef(Py_None);
done:
    if (hc) PyBuffer_Release(&canvas);
    if (hy) PyBuffer_Release(&ys);
    if (hx) PyBuffer_Release(&xs);
    if (hh) PyBuffer_Release(&hist);
    Py_DECREF(seq);
    return result;
}

PyDoc_STRVAR(counts_doc,
"counts(canvas, ys, xs, hs, ws, tables, level_itemsize, g1, alpha, glcm, rl_long, gldm,\n"
"       ngtdm, want_glrlm, want_zones[, glrlm_sums]) -> (glrlm rows, zone rows)\n\n"
"Texture counts of every ROI of a raw uint8 canvas (2D, ROIs at ys/xs of size hs x ws,\n"
"int64; see fast_kernel.py). tables: n x 256 raw value -> level, uint8 or uint16\n"
"(level_itemsize 1 or 2). Outputs may be None to skip a class: float64 glcm (n x 4 x G x\n"
"G), int64 gldm and ngtdm (n x g1 x 9). GLRLM and GLSZM come back as bytes of int64 rows,\n"
"(roi * 4 + angle, level, length, count) and (roi, level, size), or None. glrlm_sums\n"
"(float64 n x 4 x 15, needs rl_long) receives what glrlm_sums() computes from those rows.");

#define N_BUFS 11

static PyObject *counts(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *o[N_BUFS];
    o[10] = Py_None;
    Py_ssize_t itemsize, g1;
    long alpha;
    int want_glrlm, want_zones;
    if (!PyArg_ParseTuple(args, "OOOOOOnnlOOOOpp|O", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                          &itemsize, &g1, &alpha, &o[6], &o[7], &o[8], &o[9], &want_glrlm,
                          &want_zones, &o[10]))
        return NULL;
    Py_buffer v[N_BUFS];
    int held[N_BUFS] = {0};
    PyObject *result = NULL;
    Job job;
    memset(&job, 0, sizeof(job));
    job.glrlm.width = 4;
    job.zones.width = 3;
    if (itemsize != 1 && itemsize != 2) {
        PyErr_SetString(PyExc_ValueError, "level_itemsize must be 1 (uint8) or 2 (uint16)");
        return NULL;
    }
    if (g1 < 2 || g1 > (itemsize == 1 ? 256 : 65536) || alpha < 0) {
        PyErr_SetString(PyExc_ValueError, "g1 or alpha out of range");
        return NULL;
    }
    if (get_buffer(o[1], &v[1], 0, 0, "ys", 0, &held[1]) < 0) goto done;
    const Py_ssize_t n = v[1].len / 8;
    if (get_buffer(o[0], &v[0], 0, 0, "canvas", 0, &held[0]) < 0) goto done;
    if (v[0].ndim != 2 || v[0].itemsize != 1) {
        PyErr_SetString(PyExc_ValueError, "canvas must be a 2D uint8 array");
        goto done;
    }
    if (get_buffer(o[2], &v[2], 0, n * 8, "xs", 0, &held[2]) < 0) goto done;
    if (get_buffer(o[3], &v[3], 0, n * 8, "hs", 0, &held[3]) < 0) goto done;
    if (get_buffer(o[4], &v[4], 0, n * 8, "ws", 0, &held[4]) < 0) goto done;
    if (get_buffer(o[5], &v[5], 0, n * 256 * itemsize, "tables", 0, &held[5]) < 0) goto done;
    const Py_ssize_t G = g1 - 1, width = v[0].shape[1], cells = v[0].len;
    const int64_t *ys = v[1].buf, *xs = v[2].buf, *hs = v[3].buf, *ws = v[4].buf;
    for (Py_ssize_t r = 0; r < n; r++) {
        if (hs[r] < 1 || ws[r] < 1 || ys[r] < 0 || xs[r] < 0 || xs[r] + ws[r] > width
            || (ys[r] + hs[r]) * width > cells) {
            PyErr_Format(PyExc_ValueError, "ROI %zd does not lie inside the canvas", r);
            goto done;
        }
        if (ws[r] > MAX_WIDTH) { /* row positions are uint16 */
            PyErr_Format(PyExc_ValueError, "ROI %zd is wider than %d px", r, MAX_WIDTH);
            goto done;
        }
    }
    /* levels above g1 - 1 would index past the count arrays */
    if (itemsize == 1) {
        const uint8_t *t = v[5].buf;
        for (Py_ssize_t k = 0; k < n * 256; k++)
            if (t[k] >= g1) { PyErr_SetString(PyExc_ValueError, "a table level >= g1"); goto done; }
    } else {
        const uint16_t *t = v[5].buf;
        for (Py_ssize_t k = 0; k < n * 256; k++)
            if (t[k] >= g1) { PyErr_SetString(PyExc_ValueError, "a table level >= g1"); goto done; }
    }
    if (get_buffer(o[6], &v[6], 1, n * N_ANGLES * G * G * 8, "glcm", 1, &held[6]) < 0) goto done;
    if (get_buffer(o[7], &v[7], 0, n * N_ANGLES * 8, "rl_long",
                   !want_glrlm && o[10] == Py_None, &held[7]) < 0)
        goto done;
    if (get_buffer(o[10], &v[10], 1, n * N_ANGLES * 15 * 8, "glrlm_sums", 1, &held[10]) < 0)
        goto done;
    if (get_buffer(o[8], &v[8], 1, n * g1 * N_DEP * 8, "gldm", 1, &held[8]) < 0) goto done;
    if (get_buffer(o[9], &v[9], 1, n * g1 * N_DEP * 8, "ngtdm", 1, &held[9]) < 0) goto done;
    job.width = width;
    job.n = n;
    job.g1 = g1;
    job.alpha = alpha;
    job.ys = ys; job.xs = xs; job.hs = hs; job.ws = ws;
    job.tables = v[5].buf;
    job.glcm = held[6] ? v[6].buf : NULL;
    job.rl_long = held[7] ? v[7].buf : NULL;
    job.gldm = held[8] ? v[8].buf : NULL;
    job.ngtdm = held[9] ? v[9].buf : NULL;
    job.want_glrlm = want_glrlm;
    job.want_zones = want_zones;
    job.rl_sums = held[10] ? v[10].buf : NULL;
    Py_BEGIN_ALLOW_THREADS
    if (itemsize == 1) kernel_u8((const uint8_t *)v[0].buf, &job);
    else kernel_u16((const uint8_t *)v[0].buf, &job);
    Py_END_ALLOW_THREADS
    if (job.failed == 1) { PyErr_NoMemory(); goto done; }
    if (job.failed == 2) {
        PyErr_SetString(PyExc_ValueError, "a run is longer than rl_long allows");
        goto done;
    }
    PyObject *rl = want_glrlm ? PyBytes_FromStringAndSize(
        (const char *)job.glrlm.data, job.glrlm.rows * 4 * 8) : Py_NewRef(Py_None);
    PyObject *zn = want_zones ? PyBytes_FromStringAndSize(
        (const char *)job.zones.data, job.zones.rows * 3 * 8) : Py_NewRef(Py_None);
    if (rl && zn) result = PyTuple_Pack(2, rl, zn);
    Py_XDECREF(rl);
    Py_XDECREF(zn);
done:
    free(job.glrlm.data);
    free(job.zones.data);
    for (int k = 0; k < N_BUFS; k++) if (held[k]) PyBuffer_Release(&v[k]);
    return result;
}

PyDoc_STRVAR(glrlm_sums_doc,
"glrlm_sums(rows, rl_long, g1, out)\n\n"
"The per-(roi, angle) sums every GLRLM feature is a ratio of, from the GLRLM cells that\n"
"counts() returns: rows = int64 (roi * 4 + angle, level, length, count), sorted by\n"
"roi * 4 + angle (every one present); rl_long = int64 longest run per (roi, angle);\n"
"out = float64 (n * 4) x 15, overwritten with: Nr, Np, sum c/r^2, c r^2, c/g^2, c g^2,\n"
"c/(r^2 g^2), c g^2/r^2, c r^2/g^2, c r^2 g^2, sum c (r - mu_r)^2, sum p log2(p + eps)\n"
"(p = c / Nr), sum_g P(g)^2, sum_r P(r)^2 and the grey-level variance of P(g) / Nr.\n"
"Sequential sums in row order (the numpy formulas' order up to rounding).");

static PyObject *glrlm_sums(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *rows_o, *long_o, *out_o;
    Py_ssize_t g1;
    if (!PyArg_ParseTuple(args, "OOnO", &rows_o, &long_o, &g1, &out_o)) return NULL;
    Py_buffer rv, lv, ov;
    int hr = 0, hl = 0, ho = 0;
    PyObject *result = NULL;
    double *pg = NULL, *pr = NULL;
    if (g1 < 1) { PyErr_SetString(PyExc_ValueError, "g1 must be >= 1"); return NULL; }
    if (get_buffer(rows_o, &rv, 0, 0, "rows", 0, &hr) < 0) goto done;
    if (get_buffer(long_o, &lv, 0, 0, "rl_long", 0, &hl) < 0) goto done;
    const Py_ssize_t na = lv.len / 8, nrows = rv.len / 32;
    if (get_buffer(out_o, &ov, 1, na * 15 * 8, "out", 0, &ho) < 0) goto done;
    const int64_t *r = rv.buf, *longest = lv.buf;
    double *out = ov.buf;
    int64_t top = 1;
    for (Py_ssize_t a = 0; a < na; a++) if (longest[a] > top) top = longest[a];
    pg = calloc((size_t)g1, sizeof(double));
    pr = calloc((size_t)top, sizeof(double));
    if (!pg || !pr) { PyErr_NoMemory(); goto done; }
    const double eps = 2.220446049250313e-16; /* np.spacing(1) */
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t k = 0;
    for (Py_ssize_t a = 0; a < na && !bad; a++) {
        const Py_ssize_t start = k;
        double s[10] = {0};
        while (k < nrows && r[4 * k] == a) {
            const int64_t gl = r[4 * k + 1], rl = r[4 * k + 2];
            if (gl < 0 || gl >= g1 || rl < 1 || rl > longest[a]) { bad = 1; break; }
            const double c = (double)r[4 * k + 3], rf = (double)rl, g2 = (double)(gl * gl);
            const double r2 = rf * rf, sr = c / r2, lr = c * r2;
            s[0] += c; s[1] += c * rf; s[2] += sr; s[3] += lr; s[4] += c / g2;
            s[5] += c * g2; s[6] += sr / g2; s[7] += sr * g2; s[8] += lr / g2; s[9] += lr * g2;
            pg[gl] += c;
            pr[rl - 1] += c;
            k++;
        }
        if (bad) break;
        if (k < nrows && r[4 * k] < a) { bad = 2; break; } /* not sorted */
        const double nr = s[0] > 0 ? s[0] : 1.0, mu_r = s[1] / nr;
        double var = 0, ent = 0, gln = 0, rln = 0, mu = 0, glv = 0;
        for (Py_ssize_t j = start; j < k; j++) {
            const double c = (double)r[4 * j + 3], dev = (double)r[4 * j + 2] - mu_r;
            const double p = c / nr;
            var += c * dev * dev;
            ent += p * log2(p + eps);
        }
        for (Py_ssize_t g = 0; g < g1; g++) { gln += pg[g] * pg[g]; mu += pg[g] / nr * g; }
        for (Py_ssize_t g = 0; g < g1; g++) {
            const double d = g - mu;
            glv += pg[g] / nr * d * d;
            pg[g] = 0;
        }
        for (int64_t l = 0; l < longest[a]; l++) { rln += pr[l] * pr[l]; pr[l] = 0; }
        double *o = out + 15 * a;
        memcpy(o, s, sizeof(s));
        o[10] = var; o[11] = ent; o[12] = gln; o[13] = rln; o[14] = glv;
    }
    if (!bad && k != nrows) bad = 2;
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_ValueError, bad == 1 ? "a GLRLM cell outside its level or run range"
                        : "GLRLM rows are not sorted by roi * 4 + angle");
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    free(pg);
    free(pr);
    if (hr) PyBuffer_Release(&rv);
    if (hl) PyBuffer_Release(&lv);
    if (ho) PyBuffer_Release(&ov);
    return result;
}

/* Columns of glcm_features' output, in the order fast_kernel.GLCM_COLUMNS names them. */
#define GLCM_NF 24

PyDoc_STRVAR(glcm_features_doc,
"glcm_features(counts, ng, symmetric, feats, p, px, py)\n\n"
"The GLCM features of every (roi, angle) but MCC, from raw co-occurrence counts (float64\n"
"n x 4 x G x G, as counts() fills them): symmetrised when asked, normalised, then the\n"
"numpy formulas of fast_texture._glcm_features, into feats (float64 n x 4 x 24, column\n"
"order fast_kernel.GLCM_COLUMNS). p (n x 4 x G x G), px and py (n x 4 x G) receive the\n"
"normalised matrix and its marginals, which MCC reads. ng: float64 n, the ROI's level count.");

static PyObject *glcm_features(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *c_o, *ng_o, *f_o, *p_o, *px_o, *py_o;
    int symmetric;
    if (!PyArg_ParseTuple(args, "OOpOOOO", &c_o, &ng_o, &symmetric, &f_o, &p_o, &px_o, &py_o))
        return NULL;
    Py_buffer cv, nv, fv, pv, xv, yv;
    int hc = 0, hn = 0, hf = 0, hp = 0, hx = 0, hy = 0;
    PyObject *result = NULL;
    double *scratch = NULL;
    if (get_buffer(c_o, &cv, 0, 0, "counts", 0, &hc) < 0) goto done;
    if (cv.ndim != 4 || cv.itemsize != 8 || cv.shape[1] != N_ANGLES || cv.shape[2] != cv.shape[3]) {
        PyErr_SetString(PyExc_ValueError, "counts must be float64 n x 4 x G x G");
        goto done;
    }
    const Py_ssize_t n = cv.shape[0], G = cv.shape[2], GG = G * G;
    if (get_buffer(ng_o, &nv, 0, n * 8, "ng", 0, &hn) < 0) goto done;
    if (get_buffer(f_o, &fv, 1, n * N_ANGLES * GLCM_NF * 8, "feats", 0, &hf) < 0) goto done;
    if (get_buffer(p_o, &pv, 1, n * N_ANGLES * GG * 8, "p", 0, &hp) < 0) goto done;
    if (get_buffer(px_o, &xv, 1, n * N_ANGLES * G * 8, "px", 0, &hx) < 0) goto done;
    if (get_buffer(py_o, &yv, 1, n * N_ANGLES * G * 8, "py", 0, &hy) < 0) goto done;
    scratch = malloc(sizeof(double) * (size_t)(3 * G + 1));
    if (!scratch) { PyErr_NoMemory(); goto done; }
    const double eps = 2.220446049250313e-16; /* np.spacing(1) */
    const double *counts = cv.buf, *ngs = nv.buf;
    double *feats = fv.buf, *pall = pv.buf, *pxall = xv.buf, *pyall = yv.buf;
    Py_BEGIN_ALLOW_THREADS
    double *pd = scratch, *ps = scratch + G; /* |i - j| = 0..G-1; i + j = 0..2G-2 */
    for (Py_ssize_t ra = 0; ra < n * N_ANGLES; ra++) {
        const double *c = counts + ra * GG;
        double *p = pall + ra * GG, *px = pxall + ra * G, *py = pyall + ra * G;
        double *f = feats + ra * GLCM_NF;
        const double ngf = ngs[ra / N_ANGLES];
        double total = 0;
        for (Py_ssize_t i = 0; i < G; i++)
            for (Py_ssize_t j = 0; j < G; j++) {
                const double v = symmetric ? c[i * G + j] + c[j * G + i] : c[i * G + j];
                p[i * G + j] = v;
                total += v;
            }
        const double norm = total > 0 ? total : 1.0;
        memset(scratch, 0, sizeof(double) * (size_t)(3 * G - 1));
        for (Py_ssize_t i = 0; i < G; i++) { px[i] = 0; py[i] = 0; }
        double autoc = 0, energy = 0, hxy = 0, pmax = 0;
        for (Py_ssize_t i = 0; i < G; i++)
            for (Py_ssize_t j = 0; j < G; j++) {
                const double v = p[i * G + j] / norm;
                p[i * G + j] = v;
                px[i] += v;
                py[j] += v;
                pd[i > j ? i - j : j - i] += v;
                ps[i + j] += v;
                autoc += v * (double)(i + 1) * (double)(j + 1);
                energy += v * v;
                if (v > 0) hxy -= v * log2(v + eps); /* a zero adds -0.0: skipped, same sum */
                if (v > pmax) pmax = v;
            }
        double ux = 0, uy = 0;
        for (Py_ssize_t i = 0; i < G; i++) { ux += px[i] * (i + 1); uy += py[i] * (i + 1); }
        double vx = 0, vy = 0, hx = 0, hy = 0;
        for (Py_ssize_t i = 0; i < G; i++) {
            const double dx = (i + 1) - ux, dy = (i + 1) - uy;
            vx += px[i] * dx * dx;
            vy += py[i] * dy * dy;
            hx -= px[i] * log2(px[i] + eps);
            hy -= py[i] * log2(py[i] + eps);
        }
        double corm = 0, hxy1 = 0, hxy2 = 0;
        for (Py_ssize_t i = 0; i < G; i++)
            for (Py_ssize_t j = 0; j < G; j++) {
                const double v = p[i * G + j], q = px[i] * py[j];
                corm += v * ((i + 1) - ux) * ((j + 1) - uy);
                if (q > 0) { /* q = 0: an empty row or column, so v = 0 too: -0.0 terms */
                    const double lq = log2(q + eps);
                    hxy1 -= v * lq;
                    hxy2 -= q * lq;
                }
            }
        double prom = 0, shade = 0, tend = 0, savg = 0, sent = 0;
        for (Py_ssize_t k = 0; k < 2 * G - 1; k++) {
            const double ks = (double)(k + 2), ce = ks - (ux + uy), ce2 = ce * ce;
            prom += ps[k] * ce2 * ce2;
            shade += ps[k] * ce2 * ce;
            tend += ps[k] * ce2;
            savg += ps[k] * ks;
            sent -= ps[k] * log2(ps[k] + eps);
        }
        double contrast = 0, davg = 0, dent = 0, idm = 0, idmn = 0, id = 0, idn = 0, ivar = 0;
        for (Py_ssize_t k = 0; k < G; k++) {
            const double kd = (double)k;
            contrast += pd[k] * kd * kd;
            davg += pd[k] * kd;
            dent -= pd[k] * log2(pd[k] + eps);
            idm += pd[k] / (1 + kd * kd);
            idmn += pd[k] / (1 + kd * kd / (ngf * ngf));
            id += pd[k] / (1 + kd);
            idn += pd[k] / (1 + kd / ngf);
            if (k > 0) ivar += pd[k] / (kd * kd);
        }
        double dvar = 0;
        for (Py_ssize_t k = 0; k < G; k++) dvar += pd[k] * (k - davg) * (k - davg);
        const double sigx = sqrt(vx), sigy = sqrt(vy), div = fmax(hx, hy);
        f[0] = autoc;
        f[1] = ux;
        f[2] = prom;
        f[3] = shade;
        f[4] = tend;
        f[5] = contrast;
        f[6] = sigx * sigy == 0 ? 1.0 : corm / (sigx * sigy + eps);
        f[7] = davg;
        f[8] = dent;
        f[9] = dvar;
        f[10] = energy;
        f[11] = hxy;
        f[12] = div != 0 ? (hxy - hxy1) / div : 0.0;
        f[13] = hxy2 == hxy ? 0.0 : pow(1 - pow(M_E, -2 * (hxy2 - hxy)), 0.5);
        f[14] = idm;
        f[15] = idmn;
        f[16] = id;
        f[17] = idn;
        f[18] = ivar;
        f[19] = pmax;
        f[20] = savg;
        f[21] = sent;
        f[22] = vx;
        f[23] = total;
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    free(scratch);
    if (hc) PyBuffer_Release(&cv);
    if (hn) PyBuffer_Release(&nv);
    if (hf) PyBuffer_Release(&fv);
    if (hp) PyBuffer_Release(&pv);
    if (hx) PyBuffer_Release(&xv);
    if (hy) PyBuffer_Release(&yv);
    return result;
}

/*
 * MCC's eigenvalues (issue 18: LAPACK's per-matrix overhead was ~10% of a 256-px chunk).
 * For a symmetric GLCM, Q of pyradiomics' MCC is similar to A^2 with A = D^-1/2 P D^-1/2
 * (D = diag(p_x)) on the ROI's present levels, so its eigenvalues are the squares of A's.
 * A is small (one row per present level), so Householder reduction to tridiagonal form and
 * the implicit QL method (Numerical Recipes' tred2/tqli, eigenvalues only) find them, to
 * within a few eps of LAPACK's; texture._mcc stays the reference.
 */
static void tridiagonal(double *a, int n, double *d, double *e)
{
    /* a: n x n symmetric (lower triangle read, destroyed) -> diagonal d, off-diagonal e[1..] */
    for (int i = n - 1; i > 0; i--) {
        const int l = i - 1;
        double h = 0.0, scale = 0.0;
        if (l > 0) {
            for (int k = 0; k < i; k++) scale += fabs(a[i * n + k]);
            if (scale == 0.0) {
                e[i] = a[i * n + l];
            } else {
                for (int k = 0; k < i; k++) {
                    a[i * n + k] /= scale;
                    h += a[i * n + k] * a[i * n + k];
                }
                double f = a[i * n + l];
                double g = f >= 0.0 ? -sqrt(h) : sqrt(h);
                e[i] = scale * g;
                h -= f * g;
                a[i * n + l] = f - g;
                f = 0.0;
                for (int j = 0; j < i; j++) {
                    g = 0.0;
                    for (int k = 0; k < j + 1; k++) g += a[j * n + k] * a[i * n + k];
                    for (int k = j + 1; k < i; k++) g += a[k * n + j] * a[i * n + k];
                    e[j] = g / h;
                    f += e[j] * a[i * n + j];
                }
                const double hh = f / (h + h);
                for (int j = 0; j < i; j++) {
                    f = a[i * n + j];
                    e[j] = g = e[j] - hh * f;
                    for (int k = 0; k < j + 1; k++) a[j * n + k] -= f * e[k] + g * a[i * n + k];
                }
            }
        } else {
            e[i] = a[i * n + l];
        }
    }
    e[0] = 0.0;
    for (int i = 0; i < n; i++) d[i] = a[i * n + i];
}

/* Eigenvalues of the tridiagonal (d, e) into d; -1 when QL does not converge. */
static int tridiagonal_eigenvalues(double *d, double *e, int n)
{
    for (int i = 1; i < n; i++) e[i - 1] = e[i];
    e[n - 1] = 0.0;
    for (int l = 0; l < n; l++) {
        int iter = 0, m;
        do {
            for (m = l; m < n - 1; m++) {
                const double dd = fabs(d[m]) + fabs(d[m + 1]);
                if (fabs(e[m]) <= 2.220446049250313e-16 * dd) break;
            }
            if (m != l) {
                if (iter++ == 60) return -1;
                double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
                double r = sqrt(g * g + 1.0);
                g = d[m] - d[l] + e[l] / (g + (g >= 0.0 ? fabs(r) : -fabs(r)));
                double s = 1.0, c = 1.0, p = 0.0;
                int i;
                for (i = m - 1; i >= l; i--) {
                    double f = s * e[i];
                    const double b = c * e[i];
                    e[i + 1] = (r = sqrt(f * f + g * g)); /* values of order 1: no overflow */
                    if (r == 0.0) {
                        d[i + 1] -= p;
                        e[m] = 0.0;
                        break;
                    }
                    s = f / r;
                    c = g / r;
                    g = d[i + 1] - p;
                    r = (d[i] - g) * s + 2.0 * c * b;
                    d[i + 1] = g + (p = s * r);
                    g = c * r - b;
                }
                if (r == 0.0 && i >= l) continue;
                d[l] -= p;
                e[l] = g;
                e[m] = 0.0;
            }
        } while (m != l);
    }
    return 0;
}

PyDoc_STRVAR(mcc_second_doc,
"mcc_second(p, px, present, valid, out)\n\n"
"Per (roi, angle) of normalised symmetric GLCMs p (float64 n x 4 x G x G, as glcm_features\n"
"hands them back) with marginals px (n x 4 x G): the second largest eigenvalue of MCC's Q,\n"
"i.e. of A^2, A = D^-1/2 P D^-1/2 over the ROI's present levels (present: bool n x G).\n"
"Angles not valid (bool n x 4) give 0, ROIs with fewer than 2 levels NaN, and NaN also\n"
"where the QL iteration does not converge (texture._mcc_exact then takes the ROI).");

static PyObject *mcc_second(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *p_o, *x_o, *pr_o, *v_o, *out_o;
    if (!PyArg_ParseTuple(args, "OOOOO", &p_o, &x_o, &pr_o, &v_o, &out_o)) return NULL;
    Py_buffer pv, xv, prv, vv, ov;
    int hp = 0, hx = 0, hpr = 0, hv = 0, ho = 0;
    PyObject *result = NULL;
    double *scratch = NULL;
    int *idx = NULL;
    if (get_buffer(p_o, &pv, 0, 0, "p", 0, &hp) < 0) goto done;
    if (pv.ndim != 4 || pv.itemsize != 8 || pv.shape[1] != N_ANGLES || pv.shape[2] != pv.shape[3]) {
        PyErr_SetString(PyExc_ValueError, "p must be float64 n x 4 x G x G");
        goto done;
    }
    const Py_ssize_t n = pv.shape[0], G = pv.shape[2], GG = G * G;
    if (get_buffer(x_o, &xv, 0, n * N_ANGLES * G * 8, "px", 0, &hx) < 0) goto done;
    if (get_buffer(pr_o, &prv, 0, n * G, "present", 0, &hpr) < 0) goto done;
    if (get_buffer(v_o, &vv, 0, n * N_ANGLES, "valid", 0, &hv) < 0) goto done;
    if (get_buffer(out_o, &ov, 1, n * N_ANGLES * 8, "out", 0, &ho) < 0) goto done;
    if (prv.itemsize != 1 || vv.itemsize != 1) {
        PyErr_SetString(PyExc_ValueError, "present and valid must be bool arrays");
        goto done;
    }
    scratch = malloc(sizeof(double) * (size_t)(GG + 3 * G + 1));
    idx = malloc(sizeof(int) * (size_t)(G + 1));
    if (!scratch || !idx) { PyErr_NoMemory(); goto done; }
    const double *pall = pv.buf, *pxall = xv.buf;
    const uint8_t *present = prv.buf, *valid = vv.buf;
    double *out = ov.buf;
    Py_BEGIN_ALLOW_THREADS
    double *a = scratch, *d = scratch + GG, *e = d + G, *sc = e + G;
    for (Py_ssize_t r = 0; r < n; r++) {
        int k = 0;
        for (Py_ssize_t i = 0; i < G; i++)
            if (present[r * G + i]) idx[k++] = (int)i;
        for (int ang = 0; ang < N_ANGLES; ang++) {
            double *o = out + r * N_ANGLES + ang;
            if (k < 2) { *o = NAN; continue; }
            if (!valid[r * N_ANGLES + ang]) { *o = 0.0; continue; }
            const double *p = pall + (r * N_ANGLES + ang) * GG;
            const double *px = pxall + (r * N_ANGLES + ang) * G;
            for (int i = 0; i < k; i++) sc[i] = px[idx[i]] > 0 ? 1 / sqrt(px[idx[i]]) : 0.0;
            for (int i = 0; i < k; i++)
                for (int j = 0; j <= i; j++)
                    a[i * k + j] = p[idx[i] * G + idx[j]] * sc[i] * sc[j];
            tridiagonal(a, k, d, e);
            if (tridiagonal_eigenvalues(d, e, k) < 0) { *o = NAN; continue; }
            double first = -1.0, second = -1.0;
            for (int i = 0; i < k; i++) {
                const double v = d[i] * d[i];
                if (v > first) { second = first; first = v; }
                else if (v > second) second = v;
            }
            *o = second;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    free(scratch);
    free(idx);
    if (hp) PyBuffer_Release(&pv);
    if (hx) PyBuffer_Release(&xv);
    if (hpr) PyBuffer_Release(&prv);
    if (hv) PyBuffer_Release(&vv);
    if (ho) PyBuffer_Release(&ov);
    return result;
}

static PyMethodDef methods[] = {
    {"counts", counts, METH_VARARGS, counts_doc},
    {"glcm_features", glcm_features, METH_VARARGS, glcm_features_doc},
    {"glrlm_sums", glrlm_sums, METH_VARARGS, glrlm_sums_doc},
    {"mcc_second", mcc_second, METH_VARARGS, mcc_second_doc},
    {"place", place, METH_VARARGS, place_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_texture",
    "Compiled texture counting for kacl's fast radiomics backend.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__texture(void)
{
    change_lut_init();
    return PyModule_Create(&module);
}
