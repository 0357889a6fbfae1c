/* Byte-plane kernels of the tensor codec (storage/codec.py): one fused pass each way.
 *
 *   split(data, n, itemsize, rotated, out)        element bytes -> byte planes
 *   join(out, n, itemsize, rotated, planes)       byte planes -> element bytes
 *   rank(plane, step) -> (entropy, top)           order-0 entropy, 16 most frequent bytes
 *   nibble_pack(plane, top) -> (packed, side)      plane -> 4-bit codes + escaped bytes
 *
 * Plane j of an n-element tensor holds byte j of every element. With `rotated` (F32/BF16) the
 * top two planes are stored as [E7..E0] and [M6..M0 S]: the sign bit moved below the mantissa
 * so the exponent fills one byte. A plane given to `join` as a (packed, side) tuple is
 * nibble-coded: packed holds two 4-bit codes per byte (element 2k in the high nibble), side
 * is the 15 bytes that codes 0..14 stand for, one byte the encoder reserved (unused here),
 * then, in order, the bytes of every element coded 15 (escaped).
 *
 * Every length is checked against n before any byte is touched, and escapes are consumed
 * with bounds checks, so a damaged frame raises ValueError and never reads or writes out of
 * bounds. The loops run without the GIL. The numpy reference lives in tests/codec_reference.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the plane kernels assemble little-endian words; this is a big-endian target"
#endif

#define MAX_ITEMSIZE 8
#define BLOCK 8192 /* elements decoded per step: the decoded nibble planes stay in L1/L2 */
#define ESCAPE 15

/* [S E7..E1][E0 M6..M0] <-> [E7..E0][M6..M0 S], as 16-bit words (exponent byte high). */
static inline uint32_t unrotate16(uint32_t exp, uint32_t rest) {
    uint32_t w = (exp << 8) | rest;
    return ((w >> 1) | (w << 15)) & 0xFFFFu;
}

/* ---- join ------------------------------------------------------------------------------ */

typedef struct {
    Py_buffer data; /* a plain plane (n bytes) or the packed codes ((n + 1) / 2 bytes) */
    Py_buffer side; /* nibble planes only: table, reserved byte, escaped bytes */
    int nibble;
    const uint8_t *esc, *esc_end;
    uint8_t table16[16]; /* code -> byte; code 15 (escape) maps to 0 and is patched */
    uint16_t pair[256];   /* packed byte -> its two decoded bytes, element 2k in the low byte */
    uint8_t flag[256];    /* bit 0: high nibble escaped, bit 1: low nibble escaped */
} plane_t;

/* Whether any of the 16 nibbles of x is 15 (an escape). */
static inline int has_escape(uint64_t x) {
    return (x & (x >> 1) & (x >> 2) & (x >> 3) & 0x1111111111111111ull) != 0;
}

/* Decode the two elements of packed byte b into dst, taking escaped ones from the list. */
static inline int nibble_pair(plane_t *pl, uint8_t b, uint8_t *dst) {
    memcpy(dst, &pl->pair[b], 2);
    uint8_t f = pl->flag[b];
    if (f & 1u) {
        if (pl->esc == pl->esc_end)
            return -1;
        dst[0] = *pl->esc++;
    }
    if (f & 2u) {
        if (pl->esc == pl->esc_end)
            return -1;
        dst[1] = *pl->esc++;
    }
    return 0;
}

/* Table lookups for packed bytes [k, full) while no code is an escape, 8 at a time; returns
 * where it stopped: full, or fewer than 8 left, or a word holding an escape code. */
static Py_ssize_t nibble_run(const plane_t *pl, const uint8_t *restrict pk, Py_ssize_t k,
                             Py_ssize_t full, uint8_t *restrict dst) {
    for (; k + 8 <= full; k += 8) {
        uint64_t x;
        memcpy(&x, pk + k, 8);
        if (has_escape(x))
            break;
        for (Py_ssize_t j = k; j < k + 8; j++)
            memcpy(dst + 2 * j, &pl->pair[pk[j]], 2);
    }
    return k;
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_SSSE3 1
/* nibble_run with SSSE3 shuffles, 16 packed bytes at a time (every x86-64 CPU since ~2006
 * has SSSE3, but the x86-64 baseline does not, so it is chosen at run time). */
__attribute__((target("ssse3"))) static Py_ssize_t
nibble_run_ssse3(const plane_t *pl, const uint8_t *restrict pk, Py_ssize_t k, Py_ssize_t full,
                 uint8_t *restrict dst) {
    const __m128i table = _mm_loadu_si128((const __m128i *)pl->table16);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    for (; k + 16 <= full; k += 16) {
        __m128i b = _mm_loadu_si128((const __m128i *)(pk + k));
        __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
        __m128i lo = _mm_and_si128(b, low4);
        __m128i esc = _mm_or_si128(_mm_cmpeq_epi8(hi, low4), _mm_cmpeq_epi8(lo, low4));
        if (_mm_movemask_epi8(esc))
            break;
        __m128i even = _mm_shuffle_epi8(table, hi), odd = _mm_shuffle_epi8(table, lo);
        _mm_storeu_si128((__m128i *)(dst + 2 * k), _mm_unpacklo_epi8(even, odd));
        _mm_storeu_si128((__m128i *)(dst + 2 * k + 16), _mm_unpackhi_epi8(even, odd));
    }
    return k;
}
static int use_ssse3;
#endif

/* Decode elements [s, s + m) of a nibble plane into dst; s is even. -1 if escapes run out. */
static int nibble_block(plane_t *pl, Py_ssize_t s, Py_ssize_t m, uint8_t *restrict dst) {
    const uint8_t *restrict pk = (const uint8_t *)pl->data.buf + s / 2;
    Py_ssize_t full = m / 2, k = 0;
    while (k < full) {
#ifdef HAVE_SSSE3
        if (use_ssse3)
            k = nibble_run_ssse3(pl, pk, k, full, dst);
#endif
        k = nibble_run(pl, pk, k, full, dst);
        /* the next 16 packed bytes one by one: escapes, or the tail of the block */
        Py_ssize_t stop = k + 16 < full ? k + 16 : full;
        for (; k < stop; k++)
            if (nibble_pair(pl, pk[k], dst + 2 * k) < 0)
                return -1;
    }
    if (m & 1) { /* the last element of an odd plane: the low nibble is padding, ignored */
        uint8_t b = pk[full];
        dst[2 * full] = (uint8_t)pl->pair[b];
        if (pl->flag[b] & 1u) {
            if (pl->esc == pl->esc_end)
                return -1;
            dst[2 * full] = *pl->esc++;
        }
    }
    return 0;
}

/* Interleave m elements from planes p[0..itemsize) into out. */
static void assemble(uint8_t *restrict out, const uint8_t *const *p, Py_ssize_t m, int itemsize,
                     int rotated) {
    Py_ssize_t i;
    switch (itemsize) {
    case 1:
        memcpy(out, p[0], (size_t)m);
        return;
    case 2: {
        const uint8_t *restrict a = p[0], *restrict b = p[1];
        if (rotated)
            for (i = 0; i < m; i++) {
                uint16_t v = (uint16_t)unrotate16(b[i], a[i]);
                memcpy(out + 2 * i, &v, 2);
            }
        else
            for (i = 0; i < m; i++) {
                uint16_t v = (uint16_t)(a[i] | (b[i] << 8));
                memcpy(out + 2 * i, &v, 2);
            }
        return;
    }
    case 4: {
        const uint8_t *restrict a = p[0], *restrict b = p[1], *restrict c = p[2],
                                *restrict d = p[3];
        if (rotated)
            for (i = 0; i < m; i++) {
                uint32_t v = a[i] | ((uint32_t)b[i] << 8) | (unrotate16(d[i], c[i]) << 16);
                memcpy(out + 4 * i, &v, 4);
            }
        else
            for (i = 0; i < m; i++) {
                uint32_t v = a[i] | ((uint32_t)b[i] << 8) | ((uint32_t)c[i] << 16) |
                             ((uint32_t)d[i] << 24);
                memcpy(out + 4 * i, &v, 4);
            }
        return;
    }
    case 8: {
        for (i = 0; i < m; i++) {
            uint64_t lo = p[0][i] | ((uint32_t)p[1][i] << 8) | ((uint32_t)p[2][i] << 16) |
                          ((uint32_t)p[3][i] << 24);
            uint64_t hi = p[4][i] | ((uint32_t)p[5][i] << 8) |
                          ((rotated ? unrotate16(p[7][i], p[6][i])
                                    : (uint32_t)p[6][i] | ((uint32_t)p[7][i] << 8))
                           << 16);
            uint64_t v = lo | (hi << 32);
            memcpy(out + 8 * i, &v, 8);
        }
        return;
    }
    default: {
        int j;
        for (j = 0; j < itemsize; j++)
            for (i = 0; i < m; i++)
                out[(Py_ssize_t)itemsize * i + j] = p[j][i];
        if (rotated)
            for (i = 0; i < m; i++) {
                uint8_t *w = out + (Py_ssize_t)itemsize * i + itemsize - 2;
                uint16_t v = (uint16_t)unrotate16(w[1], w[0]);
                memcpy(w, &v, 2);
            }
        return;
    }
    }
}

static int check_sizes(Py_ssize_t n, Py_ssize_t itemsize, int rotated) {
    if (itemsize < 1 || itemsize > MAX_ITEMSIZE) {
        PyErr_Format(PyExc_ValueError, "element size %zd is not 1..%d", itemsize, MAX_ITEMSIZE);
        return -1;
    }
    if (n < 0 || n > PY_SSIZE_T_MAX / MAX_ITEMSIZE) {
        PyErr_Format(PyExc_ValueError, "bad element count %zd", n);
        return -1;
    }
    if (rotated && itemsize < 2) {
        PyErr_SetString(PyExc_ValueError, "a rotated sign needs at least 2-byte elements");
        return -1;
    }
    return 0;
}

static PyObject *join(PyObject *self, PyObject *args) {
    Py_buffer out;
    Py_ssize_t n, itemsize, i, j;
    int rotated, failed = 0;
    PyObject *specs, *seq = NULL, *result = NULL;
    plane_t *planes = NULL;
    uint8_t *tmp = NULL;

    if (!PyArg_ParseTuple(args, "w*nnpO:join", &out, &n, &itemsize, &rotated, &specs))
        return NULL;
    if (check_sizes(n, itemsize, rotated) < 0)
        goto done;
    if (out.len != n * itemsize || !PyBuffer_IsContiguous(&out, 'C')) {
        PyErr_SetString(PyExc_ValueError, "output buffer does not match the tensor's shape");
        goto done;
    }
    seq = PySequence_Fast(specs, "planes must be a sequence");
    if (seq == NULL)
        goto done;
    if (PySequence_Fast_GET_SIZE(seq) != itemsize) {
        PyErr_SetString(PyExc_ValueError, "plane count does not match the element size");
        goto done;
    }
    planes = PyMem_Calloc((size_t)itemsize, sizeof(plane_t));
    tmp = PyMem_Malloc((size_t)itemsize * BLOCK);
    if (planes == NULL || tmp == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (j = 0; j < itemsize; j++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, j);
        plane_t *pl = &planes[j];
        if (PyTuple_Check(item)) {
            if (PyTuple_GET_SIZE(item) != 2) {
                PyErr_SetString(PyExc_ValueError, "a nibble plane is (packed, side)");
                goto done;
            }
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(item, 0), &pl->data, PyBUF_C_CONTIGUOUS) < 0)
                goto done;
            pl->nibble = 1;
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(item, 1), &pl->side, PyBUF_C_CONTIGUOUS) < 0)
                goto done;
            if (pl->data.len != n / 2 + (n & 1)) {
                PyErr_SetString(PyExc_ValueError, "nibble plane size does not match the shape");
                goto done;
            }
            if (pl->side.len < ESCAPE + 1) {
                PyErr_SetString(PyExc_ValueError, "nibble table is truncated");
                goto done;
            }
            const uint8_t *table = pl->side.buf;
            pl->esc = table + ESCAPE + 1;
            pl->esc_end = table + pl->side.len;
            memcpy(pl->table16, table, ESCAPE);
            pl->table16[ESCAPE] = 0;
            for (i = 0; i < 256; i++) {
                unsigned hi = (unsigned)i >> 4, lo = (unsigned)i & 15u;
                uint8_t a = hi == ESCAPE ? 0 : table[hi], b = lo == ESCAPE ? 0 : table[lo];
                pl->pair[i] = (uint16_t)(a | (b << 8));
                pl->flag[i] = (uint8_t)((hi == ESCAPE) | ((lo == ESCAPE) << 1));
            }
        } else {
            if (PyObject_GetBuffer(item, &pl->data, PyBUF_C_CONTIGUOUS) < 0)
                goto done;
            if (pl->data.len != n) {
                PyErr_SetString(PyExc_ValueError, "plane size does not match the tensor's shape");
                goto done;
            }
        }
    }

    Py_BEGIN_ALLOW_THREADS;
    const uint8_t *p[MAX_ITEMSIZE];
    Py_ssize_t s;
    for (s = 0; s < n && !failed; s += BLOCK) {
        Py_ssize_t m = n - s < BLOCK ? n - s : BLOCK;
        for (j = 0; j < itemsize; j++) {
            if (planes[j].nibble) {
                uint8_t *dst = (itemsize == 1) ? (uint8_t *)out.buf + s : tmp + j * BLOCK;
                if (nibble_block(&planes[j], s, m, dst) < 0) {
                    failed = 1;
                    break;
                }
                p[j] = dst;
            } else {
                p[j] = (const uint8_t *)planes[j].data.buf + s;
            }
        }
        if (!failed && !(itemsize == 1 && planes[0].nibble))
            assemble((uint8_t *)out.buf + s * itemsize, p, m, (int)itemsize, rotated);
    }
    for (j = 0; j < itemsize && !failed; j++)
        if (planes[j].nibble && planes[j].esc != planes[j].esc_end)
            failed = 1;
    Py_END_ALLOW_THREADS;

    if (failed) {
        PyErr_SetString(PyExc_ValueError, "nibble escapes do not match the packed codes");
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    for (j = 0; planes != NULL && j < itemsize; j++) { /* a view never taken has obj NULL */
        PyBuffer_Release(&planes[j].data);
        PyBuffer_Release(&planes[j].side);
    }
    PyMem_Free(planes);
    PyMem_Free(tmp);
    Py_XDECREF(seq);
    PyBuffer_Release(&out);
    return result;
}

/* ---- split ----------------------------------------------------------------------------- */

static void split_loop(const uint8_t *restrict in, Py_ssize_t n, int itemsize, int rotated,
                       uint8_t *restrict out) {
    Py_ssize_t i;
    switch (itemsize) {
    case 1:
        memcpy(out, in, (size_t)n);
        return;
    case 2: {
        uint8_t *restrict a = out, *restrict b = out + n;
        for (i = 0; i < n; i++) {
            uint16_t v;
            memcpy(&v, in + 2 * i, 2);
            if (rotated)
                v = (uint16_t)((v << 1) | (v >> 15));
            a[i] = (uint8_t)v;
            b[i] = (uint8_t)(v >> 8);
        }
        return;
    }
    case 4: {
        uint8_t *restrict a = out, *restrict b = out + n, *restrict c = out + 2 * n,
                          *restrict d = out + 3 * n;
        if (rotated)
            for (i = 0; i < n; i++) {
                uint32_t v;
                memcpy(&v, in + 4 * i, 4);
                uint32_t top = v >> 16;
                top = (top << 1) | (top >> 15);
                a[i] = (uint8_t)v;
                b[i] = (uint8_t)(v >> 8);
                c[i] = (uint8_t)top;
                d[i] = (uint8_t)(top >> 8);
            }
        else
            for (i = 0; i < n; i++) {
                uint32_t v;
                memcpy(&v, in + 4 * i, 4);
                a[i] = (uint8_t)v;
                b[i] = (uint8_t)(v >> 8);
                c[i] = (uint8_t)(v >> 16);
                d[i] = (uint8_t)(v >> 24);
            }
        return;
    }
    default: {
        int j;
        for (j = 0; j < itemsize; j++)
            for (i = 0; i < n; i++)
                out[j * n + i] = in[(Py_ssize_t)itemsize * i + j];
        if (rotated) {
            uint8_t *restrict lo = out + (itemsize - 2) * n, *restrict hi = out + (itemsize - 1) * n;
            for (i = 0; i < n; i++) {
                uint32_t w = ((uint32_t)hi[i] << 8) | lo[i];
                w = (w << 1) | (w >> 15);
                lo[i] = (uint8_t)w;
                hi[i] = (uint8_t)(w >> 8);
            }
        }
        return;
    }
    }
}

static PyObject *split(PyObject *self, PyObject *args) {
    Py_buffer in, out;
    Py_ssize_t n, itemsize;
    int rotated;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "y*nnpw*:split", &in, &n, &itemsize, &rotated, &out))
        return NULL;
    if (check_sizes(n, itemsize, rotated) < 0)
        goto done;
    if (in.len != n * itemsize || out.len != n * itemsize) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the tensor's shape");
        goto done;
    }
    if (!PyBuffer_IsContiguous(&in, 'C') || !PyBuffer_IsContiguous(&out, 'C')) {
        PyErr_SetString(PyExc_ValueError, "buffers must be contiguous");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS;
    split_loop(in.buf, n, (int)itemsize, rotated, out.buf);
    Py_END_ALLOW_THREADS;
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return result;
}

/* ---- rank ------------------------------------------------------------------------------ */

#define TOP 16 /* the 15 table bytes and the reserved byte of a nibble plane */

static PyObject *rank(PyObject *self, PyObject *args) {
    Py_buffer plane;
    Py_ssize_t step, i;
    double entropy = 0.0;
    uint8_t top[TOP];

    if (!PyArg_ParseTuple(args, "y*n:rank", &plane, &step))
        return NULL;
    if (step < 1 || plane.len < 1) {
        PyBuffer_Release(&plane);
        PyErr_SetString(PyExc_ValueError, "rank: step must be >= 1 and the plane not empty");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS;
    /* four tables: runs of one byte value (exponents) would otherwise chain on one counter */
    int64_t t[4][256], counts[256];
    memset(t, 0, sizeof t);
    const uint8_t *p = plane.buf;
    Py_ssize_t size = (plane.len - 1) / step + 1;
    for (i = 0; i + 4 <= size; i += 4) {
        t[0][p[i * step]]++;
        t[1][p[(i + 1) * step]]++;
        t[2][p[(i + 2) * step]]++;
        t[3][p[(i + 3) * step]]++;
    }
    for (; i < size; i++)
        t[0][p[i * step]]++;
    for (i = 0; i < 256; i++) {
        counts[i] = t[0][i] + t[1][i] + t[2][i] + t[3][i];
        if (counts[i]) {
            double q = (double)counts[i] / (double)size;
            entropy -= q * log2(q);
        }
    }
    /* the TOP most frequent bytes, ties to the smaller byte (a stable sort by count) */
    for (int r = 0; r < TOP; r++) {
        int best = 0;
        for (int v = 1; v < 256; v++)
            if (counts[v] > counts[best])
                best = v;
        top[r] = (uint8_t)best;
        counts[best] = -1;
    }
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&plane);
    return Py_BuildValue("dy#", entropy, (const char *)top, (Py_ssize_t)TOP);
}

/* ---- nibble_pack ----------------------------------------------------------------------- */

static PyObject *nibble_pack(PyObject *self, PyObject *args) {
    Py_buffer plane, top;
    PyObject *packed = NULL, *side = NULL, *result = NULL;
    Py_ssize_t n, k, j, count = 0;
    uint8_t code[256];

    if (!PyArg_ParseTuple(args, "y*y*:nibble_pack", &plane, &top))
        return NULL;
    if (top.len != TOP) {
        PyErr_SetString(PyExc_ValueError, "nibble_pack: the table is 15 bytes + 1 reserved");
        goto done;
    }
    const uint8_t *tb = top.buf;
    memset(code, ESCAPE, sizeof code);
    for (k = ESCAPE - 1; k >= 0; k--) /* a repeated table byte takes its first code */
        code[tb[k]] = (uint8_t)k;
    n = plane.len;
    packed = PyBytes_FromStringAndSize(NULL, n / 2 + (n & 1));
    if (packed == NULL)
        goto done;
    const uint8_t *restrict p = plane.buf;
    uint8_t *restrict pk = (uint8_t *)PyBytes_AS_STRING(packed);
    Py_ssize_t full = n / 2;
    Py_BEGIN_ALLOW_THREADS;
    for (k = 0; k < full; k++)
        pk[k] = (uint8_t)((code[p[2 * k]] << 4) | code[p[2 * k + 1]]);
    if (n & 1) /* the last byte of an odd plane pads its low nibble with 0 */
        pk[full] = (uint8_t)(code[p[n - 1]] << 4);
    /* escapes are rare: count them in the packed codes, 8 bytes (16 codes) at a time */
    for (k = 0; k < full; k += 8) {
        uint64_t x = 0;
        Py_ssize_t stop = k + 8 < full ? k + 8 : full;
        memcpy(&x, pk + k, (size_t)(stop - k));
        if (has_escape(x))
            for (j = 2 * k; j < 2 * stop; j++)
                count += code[p[j]] == ESCAPE;
    }
    count += (n & 1) && code[p[n - 1]] == ESCAPE;
    Py_END_ALLOW_THREADS;
    side = PyBytes_FromStringAndSize(NULL, TOP + count);
    if (side == NULL)
        goto done;
    uint8_t *e = (uint8_t *)PyBytes_AS_STRING(side);
    memcpy(e, tb, TOP);
    e += TOP;
    Py_BEGIN_ALLOW_THREADS;
    for (k = 0; k < full; k += 8) { /* the escaped bytes, in plane order */
        uint64_t x = 0;
        Py_ssize_t stop = k + 8 < full ? k + 8 : full;
        memcpy(&x, pk + k, (size_t)(stop - k));
        if (has_escape(x))
            for (j = 2 * k; j < 2 * stop; j++)
                if (code[p[j]] == ESCAPE)
                    *e++ = p[j];
    }
    if ((n & 1) && code[p[n - 1]] == ESCAPE)
        *e++ = p[n - 1];
    Py_END_ALLOW_THREADS;
    result = PyTuple_Pack(2, packed, side);
done:
    Py_XDECREF(packed);
    Py_XDECREF(side);
    PyBuffer_Release(&plane);
    PyBuffer_Release(&top);
    return result;
}

/* For tests: turn the SSSE3 path off (or back on where the CPU has it); returns whether the
 * SSSE3 path was in use before. */
static PyObject *set_simd(PyObject *self, PyObject *arg) {
    int on = PyObject_IsTrue(arg), before = 0;
    if (on < 0)
        return NULL;
#ifdef HAVE_SSSE3
    before = use_ssse3;
    use_ssse3 = on && __builtin_cpu_supports("ssse3");
#endif
    return PyBool_FromLong(before);
}

static PyMethodDef methods[] = {
    {"split", split, METH_VARARGS,
     "split(data, n, itemsize, rotated, out): byte planes of n elements into out, plane j at "
     "out[j*n:(j+1)*n]; with rotated, the sign bit moves below the mantissa."},
    {"join", join, METH_VARARGS,
     "join(out, n, itemsize, rotated, planes): inverse of split; a plane is a buffer of n "
     "bytes or a nibble-coded (packed, side) tuple. ValueError if sizes or escapes mismatch."},
    {"rank", rank, METH_VARARGS,
     "rank(plane, step) -> (entropy, top): order-0 entropy in bits/byte of plane[::step] and "
     "its 16 most frequent bytes, most frequent first, ties to the smaller byte."},
    {"nibble_pack", nibble_pack, METH_VARARGS,
     "nibble_pack(plane, top) -> (packed, side): codes 0..14 for top[:15], 15 escapes, two per "
     "byte, high nibble first; side = top + the escaped bytes in plane order."},
    {"set_simd", set_simd, METH_O,
     "set_simd(on) -> was_on: use the SSSE3 nibble decoder where the CPU has it (for tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_planes",
    .m_doc = "Byte-plane kernels of adb's tensor codec.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__planes(void) {
#ifdef HAVE_SSSE3
    __builtin_cpu_init();
    use_ssse3 = __builtin_cpu_supports("ssse3");
#endif
    return PyModule_Create(&module);
}
