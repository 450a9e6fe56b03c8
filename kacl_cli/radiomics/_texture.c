/*
 * kacl_cli.radiomics._texture: the counting pass of the fast radiomics backend, compiled.
 *
 * Why C: the numpy path (fast_texture.py) needs ~60 ns per canvas pixel in whole-array
 * passes (run finding on 4 layouts, two ndimage.label calls, shifted comparisons, bincounts);
 * this loop visits each ROI pixel a few times, with every matrix of a ROI small enough for
 * L1. It fills exactly the arrays the numpy path builds (same layouts, integer counts), so
 * the feature formulas stay in one place (fast_texture.py) and the two paths are tested
 * against each other and against pyradiomics.
 *
 * Input: the mosaic's level canvas (H x W, uint8 or uint16; 0 = outside, 1..G inside), in
 * which ROIs are rectangles separated by gaps of outside pixels and kept off the border, so
 * every 8-neighbour of a ROI pixel is a valid index and is outside or in the same ROI.
 * Angles are the numpy path's: 0 = (0, 1), 1 = (1, -1), 2 = (1, 0), 3 = (1, 1), as flat
 * offsets 1, W - 1, W, W + 1 of a (first, second) pixel pair.
 *
 * Only the buffer protocol is used (no numpy headers), so the extension builds with the
 * plain setuptools of pip's isolated build environment.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define N_ANGLES 4
#define N_DEP 9 /* 0..8 neighbours */
/* GLDM/NGTDM histograms are kept in COPIES interleaved by column: smooth images hit the same
 * cell at consecutive pixels, and one copy would chain every increment on the previous
 * store (measured: 11 -> 6 ns per pixel with the vectorised neighbour sums). */
#define COPIES 4

typedef struct {
    Py_ssize_t width;
    Py_ssize_t n;
    Py_ssize_t cells; /* canvas pixels */
    Py_ssize_t g1; /* highest level + 1 */
    long alpha;
    const int64_t *ys, *xs, *hs, *ws;
    double *glcm;            /* n x 4 x G x G, or NULL */
    int64_t *glrlm;          /* nonzero GLRLM cells, rows (roi * 4 + angle, level, length,
                                count) in that order, or NULL */
    Py_ssize_t glrlm_cap;    /* rows available */
    Py_ssize_t n_cells;      /* rows written */
    const int64_t *rl_long;  /* n * 4: the longest possible run per (roi, angle) */
    int64_t *gldm;           /* n x g1 x 9, or NULL */
    int64_t *ngtdm;          /* n x g1 x 9 sums of |C L - T|, or NULL */
    int64_t *zone_roi, *zone_level, *zone_size; /* capacity: total ROI pixels, or NULL */
    Py_ssize_t n_zones;
    int failed; /* allocation failure */
} Job;

/* Per-call scratch, sized for the largest ROI of the call. */
typedef struct {
    void *pad;         /* (h + 3) x (w + 2) levels: the ROI with a ring of zeros, row 0 spare */
    int32_t *len1;     /* run length so far on each line of angles 1, 2 and 3 */
    int64_t *cm;       /* 4 x g1 x g1 co-occurrences, level 0 = outside (dropped) */
    int32_t *rl;       /* 4 x g1 x LS run counts by (level, length), level 0 dropped */
    int32_t *at;       /* columns of a row where a pixel differs from its predecessor */
    int32_t *tot, *cnt, *dep; /* per pixel of a row: neighbour level sum, count, dependents */
    int64_t *dn;       /* COPIES x g1 x 9 GLDM, then COPIES x g1 x 9 NGTDM */
    int32_t *run_col, *run_end, *parent; /* zones: runs of a ROI and their union-find */
    int64_t *run_size;
    uint16_t *run_level;
} Scratch;

static void scratch_free(Scratch *s)
{
    free(s->at); free(s->tot); free(s->cnt); free(s->dep); free(s->dn);
    free(s->pad); free(s->len1); free(s->cm); free(s->rl);
    free(s->run_col); free(s->run_end); free(s->parent); free(s->run_size); free(s->run_level);
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
    s->len1 = calloc(3 * lines, sizeof(int32_t)); /* angles 1, 2, 3 */
    s->cm = calloc(N_ANGLES * g1 * g1, sizeof(int64_t));
    s->rl = calloc(N_ANGLES * g1 * ls, sizeof(int32_t));
    s->at = calloc((size_t)wmax + 3, sizeof(int32_t));
    s->tot = calloc((size_t)wmax + 2, sizeof(int32_t));
    s->cnt = calloc((size_t)wmax + 2, sizeof(int32_t));
    s->dep = calloc((size_t)wmax + 2, sizeof(int32_t));
    s->dn = calloc(2 * COPIES * g1 * N_DEP, sizeof(int64_t));
    s->run_col = malloc(sizeof(int32_t) * (size_t)amax);
    s->run_end = malloc(sizeof(int32_t) * (size_t)amax);
    s->parent = malloc(sizeof(int32_t) * (size_t)amax);
    s->run_size = malloc(sizeof(int64_t) * (size_t)amax);
    s->run_level = malloc(sizeof(uint16_t) * (size_t)amax);
    if (!s->at || !s->tot || !s->cnt || !s->dep || !s->dn || !s->pad || !s->len1 || !s->cm || !s->rl || !s->run_col
        || !s->run_end || !s->parent || !s->run_size || !s->run_level) {
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

/*
 * GLCM and GLRLM of one ROI, from its runs. For each angle, cur runs over every pixel of
 * the ROI and of its ring below, left and right (rows 2..h+2 of `pad`) and prev = cur
 * minus the angle's offset (1, S - 1, S, S + 1). Work happens only where cur differs from
 * prev: per row, a branch-free compaction lists those columns, then each one closes the
 * run of prev's level that ends there, of length pos - last[line] (pos = x along rows, y
 * along the other angles): the GLRLM gets (level, length), the GLCM the run's length - 1
 * pairs (level, level) and the pair (prev, cur). Lines enter the ROI from the zero ring,
 * so each line's first change has an outside prev; outside levels (0) go to the dropped
 * row/column 0 (cell 0 for the GLRLM, whose outside run lengths are meaningless), so no
 * branch and no initialisation of `last` is needed.
 */
#define DEFINE_RUN_PASS(SUFFIX, T)                                                           \
static __attribute__((noinline)) void run_pass_##SUFFIX(                                      \
    const T *restrict B, int S, int h, int w, int g1, int LS, int64_t *restrict cm,           \
    int32_t *restrict rl, int32_t *restrict last, int32_t *restrict at)                       \
{                                                                                             \
    const int n = w + 2, lines = h + w + 8;                                                   \
    for (int a = 0; a < N_ANGLES; a++) {                                                      \
        const int back = a == 0 ? 1 : a == 1 ? S - 1 : a == 2 ? S : S + 1;                    \
        int64_t *restrict ca = cm + a * g1 * g1;                                              \
        int32_t *restrict ra = rl + a * g1 * LS;                                              \
        int32_t *restrict la = last + (a == 0 ? 0 : (a - 1) * lines);                         \
        for (int y = 2; y <= h + 2; y++) {                                                    \
            const T *restrict row = B + y * S;                                                \
            const T *restrict prv = row - back;                                               \
            int k = 0;                                                                        \
            for (int x = 0; x < n; x++) {                                                     \
                at[k] = x;                                                                    \
                k += row[x] != prv[x];                                                        \
            }                                                                                 \
            /* line of (y, x): rows share one slot; else x (+ y, - y) */                      \
            int32_t *restrict ln = a == 0 ? la : a == 1 ? la + y : a == 2 ? la : la + h + 3 - y; \
            const int xs = a == 0, pos_y = a == 0 ? 0 : y;                                    \
            for (int j = 0; j < k; j++) {                                                     \
                const int x = at[j], cur = row[x], p = prv[x];                                \
                const int li = xs ? 0 : x, pos = xs ? x : pos_y;                              \
                const int len = pos - ln[li];                                                 \
                ln[li] = pos;                                                                 \
                ra[p ? p * LS + len : 0]++;                                                   \
                ca[p * g1 + p] += len - 1;                                                    \
                ca[p * g1 + cur]++;                                                           \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}

/* Per pixel of a row (columns 1..w): sum and count of its in-ROI 8-neighbours and the
 * number of them within alpha levels; plain loops over three rows, which vectorise. */
#define DEFINE_NEIGHBOURS(SUFFIX, T)                                                         \
static __attribute__((noinline)) void neighbours_##SUFFIX(                                                     \
    const T *restrict u, const T *restrict m, const T *restrict d, Py_ssize_t w, long alpha,  \
    int32_t *restrict tot, int32_t *restrict cnt, int32_t *restrict dep)                      \
{                                                                                             \
    for (Py_ssize_t x = 1; x <= w; x++) {                                                     \
        const int32_t q0 = u[x - 1], q1 = u[x], q2 = u[x + 1], q3 = m[x - 1];                 \
        const int32_t q4 = m[x + 1], q5 = d[x - 1], q6 = d[x], q7 = d[x + 1];                 \
        tot[x] = q0 + q1 + q2 + q3 + q4 + q5 + q6 + q7;                                       \
        cnt[x] = (q0 != 0) + (q1 != 0) + (q2 != 0) + (q3 != 0) + (q4 != 0) + (q5 != 0)        \
                 + (q6 != 0) + (q7 != 0);                                                     \
    }                                                                                         \
    if (alpha == 0) {                                                                         \
        for (Py_ssize_t x = 1; x <= w; x++) {                                                 \
            const int32_t c = m[x];                                                           \
            dep[x] = (u[x - 1] == c) + (u[x] == c) + (u[x + 1] == c) + (m[x - 1] == c)        \
                     + (m[x + 1] == c) + (d[x - 1] == c) + (d[x] == c) + (d[x + 1] == c);     \
        }                                                                                     \
    } else {                                                                                  \
        const int32_t A = (int32_t)alpha;                                                     \
        for (Py_ssize_t x = 1; x <= w; x++) {                                                 \
            const int32_t c = m[x];                                                           \
            const int32_t q[8] = {u[x - 1], u[x], u[x + 1], m[x - 1], m[x + 1], d[x - 1],    \
                                  d[x], d[x + 1]};                                            \
            int32_t k = 0;                                                                    \
            for (int j = 0; j < 8; j++)                                                       \
                k += (q[j] != 0) & (q[j] - c <= A) & (c - q[j] <= A);                         \
            dep[x] = k;                                                                       \
        }                                                                                     \
    }                                                                                         \
}

DEFINE_RUN_PASS(u8, uint8_t)
DEFINE_RUN_PASS(u16, uint16_t)
DEFINE_NEIGHBOURS(u8, uint8_t)
DEFINE_NEIGHBOURS(u16, uint16_t)

/* GLDM and NGTDM counts of one ROI (COPIES interleaved by column). */
#define DEFINE_DN_PASS(SUFFIX, T)                                                            \
static void dn_pass_##SUFFIX(                                                                 \
    const T *restrict B, int S, int h, int w, int g1, long alpha, int64_t *restrict dmc,      \
    int64_t *restrict nmc, int32_t *restrict tot, int32_t *restrict cnt,                      \
    int32_t *restrict dep)                                                                    \
{                                                                                             \
    const int step = g1 * N_DEP;                                                              \
    for (int y = 2; y <= h + 1; y++) {                                                        \
        const T *restrict m = B + y * S;                                                      \
        neighbours_##SUFFIX(m - S, m, m + S, w, alpha, tot, cnt, dep);                        \
        for (int x = 1; x <= w; x++) {                                                        \
            const int c = m[x], k = (x & (COPIES - 1)) * step + c * N_DEP;                    \
            dmc[k + dep[x]] += 1;                                                             \
            const int dev = c * cnt[x] - tot[x];                                              \
            nmc[k + cnt[x]] += dev < 0 ? -dev : dev;                                          \
        }                                                                                     \
    }                                                                                         \
}

DEFINE_DN_PASS(u8, uint8_t)
DEFINE_DN_PASS(u16, uint16_t)

/*
 * One implementation per level dtype. Per ROI:
 * 1. copy it into `pad` with a ring of zeros (plus a spare zero row on top), so every
 *    neighbour read below is in the buffer and is 0 outside this ROI;
 * 2. per angle, one pass for GLCM and GLRLM (angle_pass; outside prevs land in the
 *    dropped level-0 row);
 * 3. per row, neighbour sums/counts (vectorised), then the GLDM and NGTDM increments;
 * 4. GLSZM: horizontal runs joined by union-find to the equal-level runs of the row above
 *    that touch them (8-connectivity: columns s - 1 .. e + 1).
 */
#define DEFINE_KERNEL(SUFFIX, T)                                                             \
static void kernel_##SUFFIX(const T *lv, Job *job)                                            \
{                                                                                             \
    Scratch sc;                                                                               \
    if (scratch_alloc(&sc, job, sizeof(T)) < 0) { job->failed = 1; return; }                  \
    const Py_ssize_t W = job->width, g1 = job->g1, G = g1 - 1;                               \
    const long alpha = job->alpha;                                                            \
    double *const glcm_out = job->glcm;                                                       \
    int64_t *const gldm_out = job->gldm, *const ngtdm_out = job->ngtdm;                       \
    const int do_rl = job->glrlm != NULL, do_cm = glcm_out != NULL;                           \
    const int do_dn = gldm_out != NULL || ngtdm_out != NULL;                                  \
    const int do_zones = job->zone_roi != NULL;                                               \
    T *const B = (T *)sc.pad;                                                                 \
    Py_ssize_t n_zones = 0;                                                                   \
    for (Py_ssize_t r = 0; r < job->n && !job->failed; r++) {                                 \
        const Py_ssize_t h = job->hs[r], w = job->ws[r], S = w + 2;                           \
        const Py_ssize_t LS = (h > w ? h : w) + 5;                                            \
        const T *src = lv + job->ys[r] * W + job->xs[r];                                      \
        memset(B, 0, sizeof(T) * (size_t)((h + 3) * S));                                      \
        for (Py_ssize_t y = 0; y < h; y++)                                                    \
            memcpy(B + (y + 2) * S + 1, src + y * W, sizeof(T) * (size_t)w);                  \
        if (do_cm || do_rl) {                                                                 \
            const Py_ssize_t RS = g1 * LS; /* one angle's run counts */                       \
            memset(sc.cm, 0, sizeof(int64_t) * (size_t)(N_ANGLES * g1 * g1));                 \
            memset(sc.rl, 0, sizeof(int32_t) * (size_t)(N_ANGLES * RS));                      \
            run_pass_##SUFFIX(B, (int)S, (int)h, (int)w, (int)g1, (int)LS, sc.cm, sc.rl,       \
                              sc.len1, sc.at);                                                \
            if (do_cm) {                                                                      \
                double *out = glcm_out + r * N_ANGLES * G * G;                                \
                for (int a = 0; a < N_ANGLES; a++)                                            \
                    for (Py_ssize_t i = 1; i < g1; i++)                                       \
                        for (Py_ssize_t j = 1; j < g1; j++)                                   \
                            out[(a * G + i - 1) * G + j - 1] =                                \
                                (double)sc.cm[(a * g1 + i) * g1 + j];                         \
            }                                                                                 \
            if (do_rl) {                                                                      \
                for (int a = 0; a < N_ANGLES; a++) {                                          \
                    const int64_t longest = job->rl_long[r * N_ANGLES + a];                   \
                    const int32_t *src_rl = sc.rl + a * RS;                                   \
                    for (Py_ssize_t i = 1; i < g1; i++) {                                     \
                        for (Py_ssize_t k = 1; k < LS; k++) {                                 \
                            const int32_t v = src_rl[i * LS + k];                             \
                            if (!v) continue;                                                 \
                            if (k > longest || job->n_cells >= job->glrlm_cap) {              \
                                job->failed = 2;                                              \
                                break;                                                        \
                            }                                                                 \
                            int64_t *cell = job->glrlm + 4 * job->n_cells++;                  \
                            cell[0] = r * N_ANGLES + a;                                       \
                            cell[1] = i;                                                      \
                            cell[2] = k;                                                      \
                            cell[3] = v;                                                      \
                        }                                                                     \
                    }                                                                         \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        if (do_dn) {                                                                          \
            int64_t *const dmc = sc.dn, *const nmc = sc.dn + COPIES * g1 * N_DEP;            \
            memset(sc.dn, 0, sizeof(int64_t) * (size_t)(2 * COPIES * g1 * N_DEP));            \
            dn_pass_##SUFFIX(B, (int)S, (int)h, (int)w, (int)g1, alpha, dmc, nmc, sc.tot,     \
                             sc.cnt, sc.dep);                                                 \
            for (Py_ssize_t i = 0; i < g1 * N_DEP; i++) {                                     \
                int64_t dv = 0, nv = 0;                                                       \
                for (int k = 0; k < COPIES; k++) {                                            \
                    dv += dmc[k * g1 * N_DEP + i];                                            \
                    nv += nmc[k * g1 * N_DEP + i];                                            \
                }                                                                             \
                if (gldm_out) gldm_out[r * g1 * N_DEP + i] = dv;                              \
                if (ngtdm_out) ngtdm_out[r * g1 * N_DEP + i] = nv;                            \
            }                                                                                 \
        }                                                                                     \
        if (do_zones) {                                                                       \
            int32_t n_runs = 0, prev_begin = 0, prev_end = 0;                                 \
            for (Py_ssize_t y = 2; y <= h + 1; y++) {                                         \
                const T *row = B + y * S;                                                     \
                const int32_t begin = n_runs;                                                 \
                for (Py_ssize_t x = 1; x <= w; x++) {                                         \
                    if (x > 1 && row[x] == row[x - 1]) continue;                              \
                    Py_ssize_t e = x;                                                         \
                    while (e < w && row[e + 1] == row[x]) e++;                                \
                    sc.run_col[n_runs] = (int32_t)x;                                          \
                    sc.run_end[n_runs] = (int32_t)e;                                          \
                    sc.run_level[n_runs] = (uint16_t)row[x];                                  \
                    sc.parent[n_runs] = n_runs;                                               \
                    sc.run_size[n_runs] = 0;                                                  \
                    n_runs++;                                                                 \
                    x = e;                                                                    \
                }                                                                             \
                int32_t j = prev_begin;                                                       \
                for (int32_t k = begin; k < n_runs; k++) {                                    \
                    const int32_t s0 = sc.run_col[k], e0 = sc.run_end[k];                     \
                    while (j < prev_end && sc.run_end[j] < s0 - 1) j++;                       \
                    for (int32_t q = j; q < prev_end && sc.run_col[q] <= e0 + 1; q++) {       \
                        if (sc.run_level[q] != sc.run_level[k]) continue;                     \
                        const int32_t a = find_root(sc.parent, q);                            \
                        const int32_t b = find_root(sc.parent, k);                            \
                        if (a < b) sc.parent[b] = a;                                          \
                        else if (b < a) sc.parent[a] = b;                                     \
                    }                                                                         \
                }                                                                             \
                prev_begin = begin;                                                           \
                prev_end = n_runs;                                                            \
            }                                                                                 \
            for (int32_t k = 0; k < n_runs; k++)                                              \
                sc.run_size[find_root(sc.parent, k)] += sc.run_end[k] - sc.run_col[k] + 1;    \
            for (int32_t k = 0; k < n_runs; k++) {                                            \
                if (sc.parent[k] != k) continue;                                              \
                job->zone_roi[n_zones] = r;                                                   \
                job->zone_level[n_zones] = sc.run_level[k];                                   \
                job->zone_size[n_zones] = sc.run_size[k];                                     \
                n_zones++;                                                                    \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    job->n_zones = n_zones;                                                                   \
    scratch_free(&sc);                                                                        \
}

DEFINE_KERNEL(u8, uint8_t)
DEFINE_KERNEL(u16, uint16_t)

/* A writable/readable buffer argument that may be None. */
static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t min_bytes,
                      const char *name, int *held)
{
    *held = 0;
    if (obj == Py_None) return 0;
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    *held = 1;
    if (view->len < min_bytes) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need %zd", name, view->len, min_bytes);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(counts_doc,
"counts(levels, itemsize, width, ys, xs, hs, ws, g1, alpha, glcm, glrlm, rl_long,\n"
"       gldm, ngtdm, zone_roi, zone_level, zone_size) -> (zones, glrlm rows)\n\n"
"Count the texture matrices of every ROI (see fast_kernel.py). Outputs may be None to\n"
"skip a class. int64 ys/xs/hs/ws/rl_long; float64 glcm (n x 4 x G x G) and int64 gldm and\n"
"ngtdm (n x g1 x 9), all zeroed; int64 glrlm rows (capacity x 4) and zones (capacity =\n"
"total ROI pixels), filled from the start.");

#define N_ARGS 13

static PyObject *counts(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *o[N_ARGS];
    Py_ssize_t itemsize, width, g1;
    long alpha;
    if (!PyArg_ParseTuple(args, "OnnOOOOnlOOOOOOOO", &o[0], &itemsize, &width, &o[1], &o[2],
                          &o[3], &o[4], &g1, &alpha, &o[5], &o[6], &o[7], &o[8], &o[9],
                          &o[10], &o[11], &o[12]))
        return NULL;
    Py_buffer v[N_ARGS];
    int held[N_ARGS] = {0};
    PyObject *result = NULL;
    Job job;
    memset(&job, 0, sizeof(job));
    if (itemsize != 1 && itemsize != 2) {
        PyErr_SetString(PyExc_ValueError, "levels must be uint8 or uint16");
        return NULL;
    }
    if (g1 < 2 || g1 > (itemsize == 1 ? 256 : 65536) || alpha < 0) {
        PyErr_SetString(PyExc_ValueError, "g1 or alpha out of range");
        return NULL;
    }
    if (get_buffer(o[1], &v[1], 0, 0, "ys", &held[1]) < 0) goto done;
    if (!held[1]) { PyErr_SetString(PyExc_ValueError, "ys is required"); goto done; }
    Py_ssize_t n = v[1].len / 8;
    if (get_buffer(o[0], &v[0], 0, 0, "levels", &held[0]) < 0) goto done;
    if (get_buffer(o[2], &v[2], 0, n * 8, "xs", &held[2]) < 0) goto done;
    if (get_buffer(o[3], &v[3], 0, n * 8, "hs", &held[3]) < 0) goto done;
    if (get_buffer(o[4], &v[4], 0, n * 8, "ws", &held[4]) < 0) goto done;
    if (!held[0] || !held[2] || !held[3] || !held[4]) {
        PyErr_SetString(PyExc_ValueError, "levels, xs, hs and ws are required");
        goto done;
    }
    const Py_ssize_t G = g1 - 1;
    Py_ssize_t area = 0;
    const int64_t *ys = v[1].buf, *xs = v[2].buf, *hs = v[3].buf, *ws = v[4].buf;
    const Py_ssize_t cells = v[0].len / itemsize;
    for (Py_ssize_t r = 0; r < n; r++) {
        /* the whole ROI and its ring of outside pixels must lie in the canvas */
        if (hs[r] < 1 || ws[r] < 1 || ys[r] < 1 || xs[r] < 1 || xs[r] + ws[r] + 1 > width
            || (ys[r] + hs[r] + 1) * width > cells) {
            PyErr_Format(PyExc_ValueError, "ROI %zd does not lie inside the canvas", r);
            goto done;
        }
        area += hs[r] * ws[r];
    }
    if (get_buffer(o[5], &v[5], 1, n * N_ANGLES * G * G * 8, "glcm", &held[5]) < 0) goto done;
    if (get_buffer(o[6], &v[6], 1, 0, "glrlm", &held[6]) < 0) goto done;
    if (get_buffer(o[7], &v[7], 0, n * N_ANGLES * 8, "rl_long", &held[7]) < 0) goto done;
    if (held[6] && !held[7]) {
        PyErr_SetString(PyExc_ValueError, "glrlm needs rl_long");
        goto done;
    }
    if (get_buffer(o[8], &v[8], 1, n * g1 * N_DEP * 8, "gldm", &held[8]) < 0) goto done;
    if (get_buffer(o[9], &v[9], 1, n * g1 * N_DEP * 8, "ngtdm", &held[9]) < 0) goto done;
    for (int k = 10; k < 13; k++) {
        if (get_buffer(o[k], &v[k], 1, area * 8, "zones", &held[k]) < 0) goto done;
    }
    job.width = width;
    job.cells = cells;
    job.n = n;
    job.g1 = g1;
    job.alpha = alpha;
    job.ys = ys; job.xs = xs; job.hs = hs; job.ws = ws;
    job.glcm = held[5] ? v[5].buf : NULL;
    job.glrlm = held[6] ? v[6].buf : NULL;
    job.glrlm_cap = held[6] ? v[6].len / 32 : 0;
    job.rl_long = held[7] ? v[7].buf : NULL;
    job.gldm = held[8] ? v[8].buf : NULL;
    job.ngtdm = held[9] ? v[9].buf : NULL;
    if (held[10] && held[11] && held[12]) {
        job.zone_roi = v[10].buf; job.zone_level = v[11].buf; job.zone_size = v[12].buf;
    }
    Py_BEGIN_ALLOW_THREADS
    if (itemsize == 1) kernel_u8((const uint8_t *)v[0].buf, &job);
    else kernel_u16((const uint16_t *)v[0].buf, &job);
    Py_END_ALLOW_THREADS
    if (job.failed == 1) { PyErr_NoMemory(); goto done; }
    if (job.failed == 2) {
        PyErr_SetString(PyExc_ValueError, "GLRLM rows overflow or a run is longer than rl_long");
        goto done;
    }
    result = Py_BuildValue("nn", job.n_zones, job.n_cells);
done:
    for (int k = 0; k < N_ARGS; k++) if (held[k]) PyBuffer_Release(&v[k]);
    return result;
}

static PyMethodDef methods[] = {
    {"counts", counts, METH_VARARGS, counts_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_texture",
    "Compiled texture counting for kacl's fast radiomics backend.", -1, methods,
};

PyMODINIT_FUNC PyInit__texture(void) { return PyModule_Create(&module); }
