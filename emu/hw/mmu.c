/* The hardware MMU of the emulated CPU, compiled: the EPT walk, the 2D walk and the TLB fill.
 *
 * The Python modules emu/hw/ept.py (walk) and emu/hw/paging.py (translate) are the reference:
 * this file makes the same checks in the same order, with the same side effects (accessed
 * and dirty flags set with a locked OR), the same caches (the vCPU's GPA->HPA cache and its
 * paging-structure cache, emu.hw.vcpu.Vcpu._make_ept and paging.translate), and gives the
 * same results; tests/hw/test_native.py proves it on random tables and accesses, and the
 * hardware tests run on both (EMU_PURE_PYTHON=1 selects the Python walkers).  Nothing here
 * decides anything the Python model does not: anything unusual (a pointer outside host
 * memory, an invalid EPTP, a GPA wider than the walk) is handed back to the Python code,
 * which raises what it raises.
 *
 * fill_cb is a UC_HOOK_TLB_FILL callback registered straight with Unicorn (as emu.hw.slice
 * registers the block-budget stub): a TLB miss that translates fills the entry with no
 * Python at all; one that exits records the outcome in the Mmu and refuses the fill
 * (Vcpu.run turns it into the exit); the few fills that need the Python model (tracing,
 * DPOR's footprints, a code page not yet scanned for exiting instructions) call it, taking
 * the GIL (Unicorn runs with the GIL released: the binding calls it through ctypes).
 *
 * Built by emu/hw/native.py (make, or on first import) as the extension module emu.hw._mmu.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <stdbool.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------- */
/* Constants (emu/hw/ept.py, emu/hw/paging.py; the address widths come from there at setup) */

#define EPT_RWX 7ULL
#define EPT_PS (1ULL << 7)
#define EPT_A (1ULL << 8)
#define EPT_D (1ULL << 9)
#define EPT_SVE (1ULL << 63)
#define RSVD_NONLEAF_TOP 0xF8ULL
#define RSVD_NONLEAF 0x78ULL
#define RSVD_EPT_1G 0x3FFFF000ULL
#define RSVD_EPT_2M 0x1FF000ULL
#define EPTP_AD (1ULL << 6)

#define PT_P (1ULL << 0)
#define PT_A (1ULL << 5)
#define PT_D (1ULL << 6)
#define PT_PS (1ULL << 7)
#define PT_XD (1ULL << 63)
#define RSVD_PT_PML4E PT_PS
#define RSVD_PT_1G 0x3FFFE000ULL
#define RSVD_PT_2M 0x1FE000ULL
#define PFERR_PRESENT 1ULL
#define PFERR_WRITE 2ULL
#define PFERR_RSVD 8ULL
#define PFERR_FETCH 16ULL
#define X86_CR0_WP (1ULL << 16)
#define EFER_NXE (1ULL << 11)
#define MSR_EFER 0xC0000080U
#define GVA_IS_VALID (1ULL << 7)
#define GVA_TRANSLATED (1ULL << 8)

enum { READ = 1, WRITE = 2, FETCH = 4, PAGING = 8 };
enum { UC_MEM_READ = 16, UC_MEM_WRITE = 17, UC_MEM_FETCH = 18 };

static uint64_t ADDR_MASK, RSVD_HIGH, EPTP_RSVD;      /* EPT: bits N-1:12, 51:N */
static uint64_t PT_ADDR, PT_RSVD_HIGH;                 /* guest paging */

/* Outcomes of a walk. */
enum { RES_OK = 0, RES_VIOL, RES_MISC, RES_PF, RES_GP, RES_FALLBACK };
/* EptMisconfig reasons: ept.MISCONFIG_REASONS has their text. */
enum { M_WNR = 1, M_RSVD_HIGH, M_RSVD_1G, M_RSVD_2M, M_MEMTYPE, M_RSVD_TOP, M_RSVD_NONLEAF };

typedef struct {
    int kind;
    uint64_t hpa; int level; int perms; int dirty;       /* RES_OK (EPT); the 2D walk adds gpa */
    uint64_t gpa; uint64_t qual; int sve;                /* RES_VIOL; RES_MISC: gpa */
    int reason; uint64_t entry;                          /* RES_MISC: reason, level, entry */
    uint64_t gva; uint64_t ec;                           /* RES_PF (gva, error code), RES_GP (gva) */
    int glevel;                                          /* RES_OK of the 2D walk: guest leaf level */
} res_t;

/* The accessed/dirty flags a walk set, for DPOR's footprints (ept.AD_LOG, paging.AD_LOG). */
typedef struct { uint64_t ptr[16]; int n; } adlog_t;

/* ---------------------------------------------------------------------------------------- */
/* An insertion-ordered hash map of fixed-width records (key words, then value words): like a
 * dict, overwriting keeps a record's place and deleting leaves a hole; clearing is O(1) (a
 * generation number in each slot). */

typedef struct {
    uint64_t *rec;          /* arec records of (kw + vw) words */
    uint8_t *live;
    uint64_t *slot;         /* cap slots: generation << 32 | (record index + 1); index 0 = empty, ~0 = hole */
    size_t nrec, nlive, arec, cap;
    uint32_t gen;
    int kw, vw;
} map_t;

#define SLOT_HOLE 0xFFFFFFFFu

static int map_init(map_t *m, int kw, int vw)
{
    memset(m, 0, sizeof *m);
    m->kw = kw; m->vw = vw; m->cap = 64; m->arec = 32; m->gen = 1;
    m->rec = PyMem_RawMalloc(m->arec * (kw + vw) * 8);
    m->live = PyMem_RawMalloc(m->arec);
    m->slot = PyMem_RawCalloc(m->cap, 8);
    return m->rec && m->live && m->slot ? 0 : -1;
}

static void map_free(map_t *m)
{
    PyMem_RawFree(m->rec); PyMem_RawFree(m->live); PyMem_RawFree(m->slot);
    m->rec = NULL; m->live = NULL; m->slot = NULL;
}

static inline uint64_t map_hash(const uint64_t *k, int kw)
{
    uint64_t h = k[0] * 0x9E3779B97F4A7C15ULL;
    if (kw > 1)
        h ^= k[1] * 0xC2B2AE3D27D4EB4FULL;
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ULL;
    return h ^ (h >> 29);
}

static inline uint64_t *map_rec(map_t *m, size_t i) { return m->rec + i * (m->kw + m->vw); }

/* The slot of ``k``: its record's (index + 1 in *found), or the free slot to use (*found 0). */
static size_t map_probe(map_t *m, const uint64_t *k, size_t *found)
{
    size_t mask = m->cap - 1, i = map_hash(k, m->kw) & mask, hole = (size_t)-1;
    for (;;) {
        uint64_t s = m->slot[i];
        uint32_t idx = (uint32_t)s;
        if ((uint32_t)(s >> 32) != m->gen || idx == 0) {
            *found = 0;
            return hole != (size_t)-1 ? hole : i;
        }
        if (idx == SLOT_HOLE) {
            if (hole == (size_t)-1)
                hole = i;
        } else {
            uint64_t *r = map_rec(m, idx - 1);
            if (r[0] == k[0] && (m->kw < 2 || r[1] == k[1])) {
                *found = idx;
                return i;
            }
        }
        i = (i + 1) & mask;
    }
}

static uint64_t *map_get(map_t *m, const uint64_t *k)
{
    size_t found;
    map_probe(m, k, &found);
    return found ? map_rec(m, found - 1) + m->kw : NULL;
}

static int map_rehash(map_t *m, size_t need)
{
    /* Compact the live records (in order) and rebuild the slots. */
    size_t w = m->kw + m->vw, n = 0;
    for (size_t i = 0; i < m->nrec; i++) {
        if (!m->live[i])
            continue;
        if (n != i)
            memmove(m->rec + n * w, m->rec + i * w, w * 8);
        m->live[n++] = 1;
    }
    m->nrec = m->nlive = n;
    size_t cap = 64;
    while (cap < 2 * (n + need) + 16)
        cap <<= 1;
    if (cap != m->cap) {
        uint64_t *s = PyMem_RawCalloc(cap, 8);
        if (!s)
            return -1;
        PyMem_RawFree(m->slot);
        m->slot = s;
        m->cap = cap;
        m->gen = 1;
    } else if (++m->gen == 0) {
        memset(m->slot, 0, cap * 8);
        m->gen = 1;
    }
    if (n + need > m->arec) {
        size_t a = m->arec;
        while (a < n + need)
            a *= 2;
        uint64_t *r = PyMem_RawRealloc(m->rec, a * w * 8);
        if (!r)
            return -1;
        m->rec = r;
        uint8_t *l = PyMem_RawRealloc(m->live, a);
        if (!l)
            return -1;
        m->live = l;
        m->arec = a;
    }
    for (size_t i = 0; i < n; i++) {
        size_t found, at = map_probe(m, map_rec(m, i), &found);
        m->slot[at] = (uint64_t)m->gen << 32 | (uint32_t)(i + 1);
    }
    return 0;
}

/* Insert or overwrite; -1 when out of memory. */
static int map_put(map_t *m, const uint64_t *k, const uint64_t *v)
{
    size_t found, at = map_probe(m, k, &found);
    if (found) {
        memcpy(map_rec(m, found - 1) + m->kw, v, m->vw * 8);
        return 0;
    }
    if (m->nrec + 1 > m->arec || 3 * (m->nrec + 1) > 2 * m->cap) {
        if (map_rehash(m, 1) < 0)
            return -1;
        at = map_probe(m, k, &found);
    }
    size_t i = m->nrec++;
    uint64_t *r = map_rec(m, i);
    memcpy(r, k, m->kw * 8);
    memcpy(r + m->kw, v, m->vw * 8);
    m->live[i] = 1;
    m->nlive++;
    m->slot[at] = (uint64_t)m->gen << 32 | (uint32_t)(i + 1);
    return 0;
}

static void map_del(map_t *m, const uint64_t *k)
{
    size_t found, at = map_probe(m, k, &found);
    if (!found)
        return;
    m->live[found - 1] = 0;
    m->nlive--;
    m->slot[at] = (uint64_t)m->gen << 32 | SLOT_HOLE;
}

static void map_clear(map_t *m)
{
    m->nrec = m->nlive = 0;
    if (m->cap > 4096) {                   /* give back what a burst took */
        uint64_t *s = PyMem_RawCalloc(64, 8);
        if (s) {
            PyMem_RawFree(m->slot);
            m->slot = s;
            m->cap = 64;
            m->gen = 1;
            return;
        }
    }
    if (++m->gen == 0) {
        memset(m->slot, 0, m->cap * 8);
        m->gen = 1;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Host memory and the locked OR of the flags */

typedef struct {
    uint64_t *q;            /* HostMemory's buffer as 64-bit words */
    uint64_t nwords;
} hostmem_t;

static inline int mem_ok(const hostmem_t *h, uint64_t ptr) { return (ptr >> 3) < h->nwords; }

/* Set ``bits`` in the word at ``ptr`` as the CPU does (a locked read-modify-write); logged
 * when it changed the word. */
static inline void set_bits(const hostmem_t *h, uint64_t ptr, uint64_t bits, adlog_t *log)
{
    uint64_t old = __atomic_fetch_or(&h->q[ptr >> 3], bits, __ATOMIC_SEQ_CST);
    if ((old & bits) != bits && log && log->n < 16)
        log->ptr[log->n++] = ptr;
}

/* ---------------------------------------------------------------------------------------- */
/* The EPT walk (ept.walk) */

typedef struct { uint64_t eptp, root; int levels; int ad; int valid; } eptp_t;

static eptp_t decode_eptp(uint64_t eptp)
{
    eptp_t d = {eptp, 0, 0, 0, 0};
    uint64_t mt = eptp & 7, pwl = ((eptp >> 3) & 7) + 1;
    if ((mt != 0 && mt != 6) || (pwl != 4 && pwl != 5) || (eptp & EPTP_RSVD))
        return d;
    d.root = eptp & ADDR_MASK;
    d.levels = (int)pwl;
    d.ad = !!(eptp & EPTP_AD);
    d.valid = 1;
    return d;
}

static inline int misconfig(res_t *r, uint64_t gpa, int reason, int level, uint64_t e)
{
    r->kind = RES_MISC; r->gpa = gpa; r->reason = reason; r->level = level; r->entry = e;
    return RES_MISC;
}

static int ept_walk(const hostmem_t *h, const eptp_t *p, uint64_t gpa, int access, int set_ad,
                    adlog_t *log, res_t *r)
{
    if (gpa >> (12 + 9 * p->levels))
        return r->kind = RES_FALLBACK;       /* ValueError: wider than the walk translates */
    uint64_t table = p->root, ptr = 0, e = 0, used[5];
    int perms = EPT_RWX, nused = 0, level = p->levels, shift = 0;
    for (;;) {
        shift = 12 + 9 * (level - 1);
        ptr = table + (((gpa >> shift) & 511) << 3);
        if (!mem_ok(h, ptr))
            return r->kind = RES_FALLBACK;   /* IndexError */
        e = h->q[ptr >> 3];
        int rwx = e & EPT_RWX;
        if (!rwx) {
            r->kind = RES_VIOL; r->gpa = gpa; r->qual = (uint64_t)access; r->sve = !!(e & EPT_SVE);
            return RES_VIOL;
        }
        if ((rwx & 3) == 2)
            return misconfig(r, gpa, M_WNR, level, e);
        if (e & RSVD_HIGH)
            return misconfig(r, gpa, M_RSVD_HIGH, level, e);
        int leaf = level == 1 || ((e & EPT_PS) && level <= 3);
        if (leaf) {
            if (level == 3 && (e & RSVD_EPT_1G))
                return misconfig(r, gpa, M_RSVD_1G, level, e);
            if (level == 2 && (e & RSVD_EPT_2M))
                return misconfig(r, gpa, M_RSVD_2M, level, e);
            int mt = (e >> 3) & 7;
            if (mt == 2 || mt == 3 || mt == 7)
                return misconfig(r, gpa, M_MEMTYPE, level, e);
        } else if (level >= 4) {
            if (e & RSVD_NONLEAF_TOP)
                return misconfig(r, gpa, M_RSVD_TOP, level, e);
        } else if (e & RSVD_NONLEAF) {
            return misconfig(r, gpa, M_RSVD_NONLEAF, level, e);
        }
        perms &= rwx;
        if (p->ad && set_ad && !(e & EPT_A))
            used[nused++] = ptr;
        if (leaf)
            break;
        table = e & ADDR_MASK;
        level--;
    }
    if ((perms & access) != access) {
        r->kind = RES_VIOL; r->gpa = gpa; r->qual = (uint64_t)access | (uint64_t)perms << 3;
        r->sve = !!(e & EPT_SVE);
        return RES_VIOL;
    }
    int dirty = 1;
    if (p->ad) {
        if (set_ad) {
            for (int i = 0; i < nused; i++)
                set_bits(h, used[i], EPT_A, log);
            if ((access & 2) && !(e & EPT_D)) {
                set_bits(h, ptr, EPT_D, log);
                e |= EPT_D;
            }
        }
        dirty = !!(e & EPT_D);
    }
    uint64_t page_mask = (1ULL << shift) - 1;
    r->kind = RES_OK;
    r->hpa = (e & ADDR_MASK & ~page_mask) | (gpa & page_mask);
    r->level = level; r->perms = perms; r->dirty = dirty;
    return RES_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* The vCPU's MMU */

typedef int (*uc_reg_read_t)(void *uc, int regid, void *value);
typedef int (*uc_emu_start_t)(void *uc, uint64_t begin, uint64_t until, uint64_t timeout, size_t count);
typedef int (*uc_reg_write_t)(void *uc, int regid, const void *value);
typedef int (*uc_emu_stop_t)(void *uc);

struct uc_tlb_entry { uint64_t paddr; uint32_t perms; };
struct uc_x86_msr { uint32_t rid; uint64_t value; };

#define CODE_LOG_MAX 4096

typedef struct {
    PyObject_HEAD
    hostmem_t h;
    PyObject *mem;                   /* the HostMemory (keeps the buffer alive) */
    /* EPT pointers (Vcpu.load_eptp): GPAs with shared_mask set, or all when there is no
       secure EPTP, go through the shared one. */
    int have_eptp, have_secure;
    eptp_t shared, secure;
    uint64_t shared_mask;
    int pt_shared, pt_secure;        /* the EPT access of a guest paging-structure read */
    /* Unicorn */
    void *uc;
    uc_reg_read_t reg_read;
    uc_emu_start_t emu_start;
    uc_reg_write_t reg_write;
    uc_emu_stop_t emu_stop;
    int reg_cr3, reg_cr0, reg_msr, reg_rip;
    uint64_t rip;                    /* RIP as emu_start returned (start()) */
    /* what the fill reads */
    int exiting;                     /* an exit is recorded: refuse every fill (Vcpu.pending) */
    int force_py;                    /* every fill goes to the Python model (tracing, DPOR) */
    int slicing;                     /* Vcpu.slice_blocks: PAUSEs get hooks as code pages fill */
    unsigned long long fills;        /* Vcpu.stats_fills */
    /* the exit recorded by a refused fill (Vcpu.pending once emu_start returns) */
    res_t fault;
    int fault_kind;
    uint64_t fault_gla;
    int fault_access;
    /* caches */
    map_t gpa;                       /* gfn -> (hpa page, level | perms << 8 | dirty << 16) */
    map_t ps;                        /* (table, gva >> 21) -> 3 x (entry GPA, entry HPA, entry) */
    map_t tlb;                       /* GVA page -> HPA page (Vcpu.tlb_shadow) */
    map_t scanned;                   /* (GVA page, HPA page) -> 1 exit sites scanned | 2 PAUSEs hooked */
    uint64_t code_log[CODE_LOG_MAX]; /* host pfns filled executable, for Vcpu.code_pfns */
    int ncode;
    PyObject *fill_py;               /* Vcpu._fill_slow(vaddr, Unicorn's access type) -> paddr | perms, or -1 */
    PyObject *fetch_py;              /* Vcpu._fetch_slow(vaddr, hpa) -> bool */
} Mmu;

/* The Python side, from setup(). */
static PyObject *walk_py;            /* ept's Python walk (the fallback) */
static PyObject *misconfig_py;       /* ept._misconfig(gpa, reason, level, entry) */
static PyObject *ept_module, *paging_module, *str_AD_LOG, *str_base_address, *str_size;

typedef struct { PyTypeObject *type; Py_ssize_t off[6]; int n; } cls_t;
static cls_t C_TRANS, C_VIOL, C_PF, C_GP, C_XL;

static int cls_init(cls_t *c, PyObject *cls, const char *const *names)
{
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "setup: not a class");
        return -1;
    }
    c->type = (PyTypeObject *)cls;
    Py_INCREF(cls);
    c->n = 0;
    for (; *names; names++) {
        PyObject *d = PyObject_GetAttrString(cls, *names);
        if (!d)
            return -1;
        if (!Py_IS_TYPE(d, &PyMemberDescr_Type) || ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
            Py_DECREF(d);
            PyErr_Format(PyExc_TypeError, "setup: %s.%s is not a slot", c->type->tp_name, *names);
            return -1;
        }
        c->off[c->n++] = ((PyMemberDescrObject *)d)->d_member->offset;
        Py_DECREF(d);
    }
    return 0;
}

/* An instance of the class with its slots set to ``vals`` (references stolen), as its
 * __init__ would set them. */
static PyObject *cls_new(cls_t *c, PyObject **vals)
{
    for (int i = 0; i < c->n; i++)
        if (!vals[i]) {
            for (int j = 0; j < c->n; j++)
                Py_XDECREF(vals[j]);
            return NULL;
        }
    PyObject *o = c->type->tp_alloc(c->type, 0);
    if (!o) {
        for (int j = 0; j < c->n; j++)
            Py_DECREF(vals[j]);
        return NULL;
    }
    for (int i = 0; i < c->n; i++)
        *(PyObject **)((char *)o + c->off[i]) = vals[i];
    return o;
}

static PyObject *pybool(int b) { return Py_NewRef(b ? Py_True : Py_False); }

/* The Python object of an EPT walk's outcome (not RES_FALLBACK). */
static PyObject *ept_result(const res_t *r)
{
    switch (r->kind) {
    case RES_OK: {
        PyObject *v[4] = {PyLong_FromUnsignedLongLong(r->hpa), PyLong_FromLong(r->level),
                          PyLong_FromLong(r->perms), pybool(r->dirty)};
        return cls_new(&C_TRANS, v);
    }
    case RES_VIOL: {
        PyObject *v[3] = {PyLong_FromUnsignedLongLong(r->gpa), PyLong_FromUnsignedLongLong(r->qual),
                          pybool(r->sve)};
        return cls_new(&C_VIOL, v);
    }
    case RES_MISC:
        return PyObject_CallFunction(misconfig_py, "KiiK", (unsigned long long)r->gpa, r->reason, r->level,
                                     (unsigned long long)r->entry);
    case RES_PF: {
        PyObject *v[2] = {PyLong_FromUnsignedLongLong(r->gva), PyLong_FromUnsignedLongLong(r->ec)};
        return cls_new(&C_PF, v);
    }
    case RES_GP: {
        PyObject *v[1] = {PyLong_FromUnsignedLongLong(r->gva)};
        return cls_new(&C_GP, v);
    }
    }
    PyErr_SetString(PyExc_SystemError, "emu.hw._mmu: no result");
    return NULL;
}

/* ept.AD_LOG / paging.AD_LOG: append what a walk made with the GIL held set. */
static int flush_adlog(PyObject *module, const adlog_t *log)
{
    if (!log->n)
        return 0;
    PyObject *lst = PyObject_GetAttr(module, str_AD_LOG);
    if (!lst)
        return -1;
    int rc = 0;
    if (lst != Py_None) {
        for (int i = 0; i < log->n && rc == 0; i++) {
            PyObject *p = PyLong_FromUnsignedLongLong(log->ptr[i]);
            rc = p ? PyList_Append(lst, p) : -1;
            Py_XDECREF(p);
        }
    }
    Py_DECREF(lst);
    return rc;
}

static int ad_logging(PyObject *module)
{
    PyObject *lst = PyObject_GetAttr(module, str_AD_LOG);
    if (!lst) {
        PyErr_Clear();
        return 0;
    }
    int on = lst != Py_None;
    Py_DECREF(lst);
    return on;
}

/* -- the vCPU's EPT access (Vcpu._make_ept's ``ept``) ------------------------------------ */

static int vcpu_ept(Mmu *m, uint64_t gpa, int access, adlog_t *log, res_t *r)
{
    if (!m->have_eptp)
        return r->kind = RES_FALLBACK;
    const eptp_t *p;
    int pt;
    if (!m->have_secure || (gpa & m->shared_mask)) {
        p = &m->shared; pt = m->pt_shared;
    } else {
        p = &m->secure; pt = m->pt_secure;
    }
    if (access == PAGING)
        access = pt;
    uint64_t gfn = gpa >> 12, *c = map_get(&m->gpa, &gfn);
    if (c) {
        int perms = (c[1] >> 8) & 0xFF, dirty = (c[1] >> 16) & 1;
        if ((perms & access) == access && (dirty || !(access & 2))) {
            r->kind = RES_OK; r->hpa = c[0] | (gpa & 0xFFF); r->level = c[1] & 0xFF;
            r->perms = perms; r->dirty = dirty;
            return RES_OK;
        }
    }
    int k = ept_walk(&m->h, p, gpa, access, 1, log, r);
    if (k == RES_OK) {
        uint64_t v[2] = {r->hpa & ~0xFFFULL, (uint64_t)r->level | (uint64_t)r->perms << 8 | (uint64_t)r->dirty << 16};
        if (map_put(&m->gpa, &gfn, v) < 0)
            return r->kind = RES_FALLBACK;
    }
    return k;
}

/* -- the 2D walk (paging.translate, with the vCPU's paging-structure cache) --------------- */

static int read_nxe(Mmu *m)
{
    struct uc_x86_msr msr = {MSR_EFER, 0};
    m->reg_read(m->uc, m->reg_msr, &msr);
    return !!(msr.value & EFER_NXE);
}

static inline int ept_exit(res_t *r, int paging_structure)
{
    if (r->kind == RES_VIOL)
        r->qual |= GVA_IS_VALID | (paging_structure ? 0 : GVA_TRANSLATED);
    return r->kind;
}

/* ``nxe``: 0/1, or -1 to read EFER when it matters (the fill); ``use_ps``: with the
 * paging-structure cache (always, but for the benchmark of a whole walk). */
static int translate(Mmu *m, uint64_t cr3, uint64_t gva, int access, int wp, int nxe, int use_ps, adlog_t *elog,
                     adlog_t *glog, res_t *r)
{
    const hostmem_t *h = &m->h;
    if ((gva >> 47) != 0 && (gva >> 47) != 0x1FFFF) {
        r->kind = RES_GP; r->gva = gva;
        return RES_GP;
    }
    if (access == FETCH && nxe < 0)
        nxe = read_nxe(m);
    uint64_t pfec = (access == WRITE ? PFERR_WRITE : 0) | (access == FETCH && nxe ? PFERR_FETCH : 0);
    uint64_t table = cr3 & PT_ADDR, e = 0;
    uint64_t ent[4][3];                 /* (entry GPA, entry HPA, value) from the top */
    int n = 0, rw = 1, us = 1, level = 4, shift = 12, cached_leaf = 0, have_key = use_ps;
    uint64_t xd = 0;
    uint64_t key[2] = {table, gva >> 21};
    (void)us;
    uint64_t *hit = use_ps ? map_get(&m->ps, key) : NULL;
    if (hit) {
        for (int i = 0; i < 3; i++) {
            if (!mem_ok(h, hit[3 * i + 1]) || h->q[hit[3 * i + 1] >> 3] != hit[3 * i + 2]) {
                map_del(&m->ps, key);
                hit = NULL;
                break;
            }
        }
    }
    if (hit) {
        memcpy(ent, hit, 9 * 8);
        n = 3;
        uint64_t pde = ent[2][2], both = ent[0][2] & ent[1][2] & pde;
        rw = (both >> 1) & 1;
        us = (both >> 2) & 1;
        if (pde & PT_PS) {              /* a 2M page: the walk is done */
            level = 2; shift = 21; e = pde;
            have_key = 0;
            cached_leaf = 1;
        } else {
            level = 1;
            table = pde & PT_ADDR;
        }
    }
    while (!cached_leaf) {
        shift = 12 + 9 * (level - 1);
        uint64_t egpa = table + (((gva >> shift) & 511) << 3);
        int k = vcpu_ept(m, egpa, PAGING, elog, r);
        if (k != RES_OK)
            return ept_exit(r, 1);
        uint64_t ehpa = r->hpa;
        if (!mem_ok(h, ehpa))
            return r->kind = RES_FALLBACK;
        e = h->q[ehpa >> 3];
        if (!(e & PT_P)) {
            r->kind = RES_PF; r->gva = gva; r->ec = pfec;
            return RES_PF;
        }
        uint64_t rsvd = PT_RSVD_HIGH;
        int leaf = level == 1 || ((e & PT_PS) && level <= 3);
        if (level == 4)
            rsvd |= RSVD_PT_PML4E;
        else if (leaf && level == 3)
            rsvd |= RSVD_PT_1G;
        else if (leaf && level == 2)
            rsvd |= RSVD_PT_2M;
        if (e & PT_XD) {
            if (nxe < 0)
                nxe = read_nxe(m);
            if (!nxe)
                rsvd |= PT_XD;          /* XD is reserved unless EFER.NXE */
        }
        if (e & rsvd) {
            r->kind = RES_PF; r->gva = gva; r->ec = pfec | PFERR_PRESENT | PFERR_RSVD;
            return RES_PF;
        }
        rw &= e >> 1;
        us &= e >> 2;
        xd |= e >> 63;
        ent[n][0] = egpa; ent[n][1] = ehpa; ent[n][2] = e;
        n++;
        if (leaf)
            break;
        table = e & PT_ADDR;
        level--;
    }
    if (have_key && n >= 3 && !xd && (ent[2][2] & PT_A) && (ent[0][2] & ent[1][2] & PT_A)) {
        if (map_put(&m->ps, key, &ent[0][0]) < 0)
            return r->kind = RES_FALLBACK;
    }
    /* Permission checks on the combined rights (a supervisor access). */
    int guest_w = (rw & 1) || !wp;
    if (access == WRITE && !guest_w) {
        r->kind = RES_PF; r->gva = gva; r->ec = pfec | PFERR_PRESENT;
        return RES_PF;
    }
    if (xd && nxe < 0)
        nxe = read_nxe(m);
    int guest_x = !(xd && nxe);
    if (access == FETCH && !guest_x) {
        r->kind = RES_PF; r->gva = gva; r->ec = pfec | PFERR_PRESENT;
        return RES_PF;
    }
    /* Accessed flags in every entry, dirty in the leaf on a write (EPT write accesses). */
    int last = n - 1;
    for (int i = 0; i < n; i++) {
        uint64_t want = PT_A | (i == last && access == WRITE ? PT_D : 0);
        if ((ent[i][2] & want) == want)
            continue;
        int k = vcpu_ept(m, ent[i][0], WRITE, elog, r);
        if (k != RES_OK)
            return ept_exit(r, 1);
        set_bits(h, ent[i][1], want, glog);
    }
    int leaf_dirty = access == WRITE || (ent[last][2] & PT_D);
    uint64_t page_mask = (1ULL << shift) - 1;
    uint64_t gpa = (e & PT_ADDR & ~page_mask) | (gva & page_mask);
    int k = vcpu_ept(m, gpa, access, elog, r);
    if (k != RES_OK)
        return ept_exit(r, 0);
    int tperms = r->perms, perms = tperms & READ;
    if (guest_x)
        perms |= tperms & FETCH;
    if (guest_w && (tperms & WRITE) && leaf_dirty && r->dirty)
        perms |= WRITE;
    r->kind = RES_OK; r->gva = gva; r->gpa = gpa; r->perms = perms; r->glevel = level;
    /* r->hpa, r->level: the final EPT translation's */
    return RES_OK;
}

/* -- the fill ---------------------------------------------------------------------------- */

/* Call into Python (the GIL taken); -1 on a refusal or an error it raised. */
static long long call_py(PyObject *fn, unsigned long long a, unsigned long long b)
{
    PyGILState_STATE g = PyGILState_Ensure();
    long long out = -1;
    PyObject *res = PyObject_CallFunction(fn, "KK", a, b);
    if (res) {
        out = PyLong_AsLongLong(res);
        Py_DECREF(res);
    }
    if (PyErr_Occurred()) {
        PyErr_WriteUnraisable(fn);      /* the Python side guards itself (@hook): never here */
        out = -1;
    }
    PyGILState_Release(g);
    return out;
}

static bool fill_slow(Mmu *m, uint64_t vaddr, int type, struct uc_tlb_entry *entry)
{
    long long r = call_py(m->fill_py, vaddr, (unsigned long long)type);
    if (r < 0) {
        m->exiting = 1;                 /* Vcpu.pending is set (or a hook error is kept) */
        return false;
    }
    entry->paddr = (uint64_t)r & ~0xFFFULL;
    entry->perms = (uint32_t)(r & 7);
    return true;
}

/* The UC_HOOK_TLB_FILL callback (Vcpu._tlb_fill's logic). */
static bool fill_cb(void *uc, uint64_t vaddr, int type, struct uc_tlb_entry *entry, void *user)
{
    Mmu *m = (Mmu *)user;
    if (m->exiting)
        return false;                   /* already exiting: refuse whatever Unicorn tries next */
    m->fills++;
    int acc = type == UC_MEM_READ ? READ : type == UC_MEM_WRITE ? WRITE : type == UC_MEM_FETCH ? FETCH : 0;
    if (m->force_py || !acc || !m->have_eptp)
        return fill_slow(m, vaddr, type, entry);
    uint64_t cr3 = 0, cr0 = 0;
    m->reg_read(uc, m->reg_cr3, &cr3);
    m->reg_read(uc, m->reg_cr0, &cr0);
    res_t r;
    int k = translate(m, cr3, vaddr, acc, (int)!!(cr0 & X86_CR0_WP), -1, 1, NULL, NULL, &r);
    if (k == RES_FALLBACK)
        return fill_slow(m, vaddr, type, entry);
    if (k != RES_OK) {
        m->fault = r;
        m->fault_kind = k;
        m->fault_gla = vaddr;
        m->fault_access = acc;
        m->exiting = 1;
        return false;
    }
    uint64_t hpa = r.hpa & ~0xFFFULL;
    entry->paddr = hpa;
    if (map_put(&m->tlb, &vaddr, &hpa) < 0)
        return fill_slow(m, vaddr, type, entry);
    if (acc != FETCH) {
        /* A data access installs no execute right (Vcpu._tlb_fill says why). */
        entry->perms = (uint32_t)(r.perms & ~FETCH);
        return true;
    }
    entry->perms = (uint32_t)r.perms;
    uint64_t key[2] = {vaddr, hpa}, *bits = map_get(&m->scanned, key);
    int done = bits && (*bits & 1) && (!m->slicing || (*bits & 2));
    uint64_t pfn = hpa >> 12;
    if (done && (m->ncode && m->code_log[m->ncode - 1] == pfn))
        return true;
    if (done && m->ncode < CODE_LOG_MAX) {
        m->code_log[m->ncode++] = pfn;
        return true;
    }
    /* The code page needs its exit sites (or PAUSEs) hooked, or the log is full: Python. */
    if (call_py(m->fetch_py, vaddr, hpa) <= 0) {
        m->exiting = 1;                 /* a hook error is kept: emulation stops */
        return false;
    }
    return true;
}

/* ---------------------------------------------------------------------------------------- */
/* The Mmu type */

static int get_u64(PyObject *o, uint64_t *v)
{
    if (!PyLong_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "an int is required");
        return -1;
    }
    *v = PyLong_AsUnsignedLongLong(o);
    if (*v == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    return 0;
}

static int mem_of(PyObject *mem, hostmem_t *h)
{
    PyObject *a = PyObject_GetAttr(mem, str_base_address);
    if (!a)
        return -1;
    PyObject *s = PyObject_GetAttr(mem, str_size);
    if (!s) {
        Py_DECREF(a);
        return -1;
    }
    uint64_t base = 0, size = 0;
    int rc = get_u64(a, &base) < 0 || get_u64(s, &size) < 0 ? -1 : 0;
    Py_DECREF(a);
    Py_DECREF(s);
    h->q = (uint64_t *)(uintptr_t)base;
    h->nwords = size >> 3;
    return rc;
}

static int Mmu_init(Mmu *self, PyObject *args, PyObject *kw)
{
    PyObject *mem, *fill_py, *fetch_py;
    unsigned long long uc, reg_read, reg_write, emu_start, emu_stop;
    int cr3, cr0, msr, rip;
    if (!PyArg_ParseTuple(args, "OKKKKKiiiiOO", &mem, &uc, &reg_read, &reg_write, &emu_start, &emu_stop, &cr3, &cr0,
                          &msr, &rip, &fill_py, &fetch_py))
        return -1;
    if (!paging_module) {
        PyErr_SetString(PyExc_RuntimeError, "emu.hw._mmu: setup_paging() first (import emu.hw.paging)");
        return -1;
    }
    if (mem_of(mem, &self->h) < 0)
        return -1;
    Py_XSETREF(self->mem, Py_NewRef(mem));
    Py_XSETREF(self->fill_py, Py_NewRef(fill_py));
    Py_XSETREF(self->fetch_py, Py_NewRef(fetch_py));
    self->uc = (void *)(uintptr_t)uc;
    self->reg_read = (uc_reg_read_t)(uintptr_t)reg_read;
    self->emu_start = (uc_emu_start_t)(uintptr_t)emu_start;
    self->reg_write = (uc_reg_write_t)(uintptr_t)reg_write;
    self->emu_stop = (uc_emu_stop_t)(uintptr_t)emu_stop;
    self->reg_cr3 = cr3; self->reg_cr0 = cr0; self->reg_msr = msr; self->reg_rip = rip;
    if (!self->gpa.rec && (map_init(&self->gpa, 1, 2) < 0 || map_init(&self->ps, 2, 9) < 0 ||
                           map_init(&self->tlb, 1, 1) < 0 || map_init(&self->scanned, 2, 1) < 0)) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static int Mmu_traverse(Mmu *self, visitproc visit, void *arg)
{
    Py_VISIT(self->mem);
    Py_VISIT(self->fill_py);
    Py_VISIT(self->fetch_py);
    return 0;
}

static int Mmu_clear(Mmu *self)
{
    Py_CLEAR(self->mem);
    Py_CLEAR(self->fill_py);
    Py_CLEAR(self->fetch_py);
    return 0;
}

static void Mmu_dealloc(Mmu *self)
{
    PyObject_GC_UnTrack(self);
    Mmu_clear(self);
    map_free(&self->gpa); map_free(&self->ps); map_free(&self->tlb); map_free(&self->scanned);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* set_eptp(eptp, secure_eptp, shared_mask): Vcpu._make_ept (a new, empty GPA cache). */
static PyObject *Mmu_set_eptp(Mmu *self, PyObject *args)
{
    PyObject *eptp, *secure;
    unsigned long long shared;
    if (!PyArg_ParseTuple(args, "OOK", &eptp, &secure, &shared))
        return NULL;
    uint64_t v;
    self->have_eptp = self->have_secure = 0;
    if (eptp != Py_None) {
        if (get_u64(eptp, &v) < 0)
            return NULL;
        self->shared = decode_eptp(v);
        self->have_eptp = self->shared.valid;
        self->pt_shared = self->shared.ad ? 3 : 1;
    }
    if (secure != Py_None) {
        if (get_u64(secure, &v) < 0)
            return NULL;
        self->secure = decode_eptp(v);
        self->have_secure = 1;
        self->have_eptp &= self->secure.valid;
        self->pt_secure = self->secure.ad ? 3 : 1;
    }
    self->shared_mask = shared;
    map_clear(&self->gpa);
    Py_RETURN_NONE;
}

static PyObject *Mmu_flush(Mmu *self, PyObject *unused)
{
    map_clear(&self->gpa);
    map_clear(&self->ps);
    map_clear(&self->tlb);
    Py_RETURN_NONE;
}

static PyObject *Mmu_clear_gpa(Mmu *self, PyObject *unused)
{
    map_clear(&self->gpa);
    Py_RETURN_NONE;
}

/* ept(gpa, access): the vCPU's EPT access from Python (what Vcpu._ept is). */
static PyObject *Mmu_ept(Mmu *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "ept(gpa, access)");
        return NULL;
    }
    uint64_t gpa;
    if (get_u64(args[0], &gpa) < 0)
        return NULL;
    long access = PyLong_AsLong(args[1]);
    if (access == -1 && PyErr_Occurred())
        return NULL;
    adlog_t log = {.n = 0};
    int logging = ad_logging(ept_module);
    res_t r;
    int k = vcpu_ept(self, gpa, (int)access, logging ? &log : NULL, &r);
    if (logging && flush_adlog(ept_module, &log) < 0)
        return NULL;
    if (k != RES_FALLBACK)
        return ept_result(&r);
    /* The Python walk, on the same cache (it raises what it raises). */
    if (!self->have_eptp) {
        PyErr_SetString(PyExc_TypeError, "the vCPU has no EPT pointer loaded");
        return NULL;
    }
    const eptp_t *p = (!self->have_secure || (gpa & self->shared_mask)) ? &self->shared : &self->secure;
    if (access == PAGING)
        access = p == &self->shared ? self->pt_shared : self->pt_secure;
    PyObject *t = PyObject_CallFunction(walk_py, "OKKl", self->mem, (unsigned long long)p->eptp,
                                        (unsigned long long)gpa, access);
    if (t && Py_IS_TYPE(t, C_TRANS.type)) {
        uint64_t hpa, gfn = gpa >> 12;
        PyObject **s = (PyObject **)((char *)t + C_TRANS.off[0]);
        if (get_u64(s[0], &hpa) < 0) {
            Py_DECREF(t);
            return NULL;
        }
        long level = PyLong_AsLong(*(PyObject **)((char *)t + C_TRANS.off[1]));
        long perms = PyLong_AsLong(*(PyObject **)((char *)t + C_TRANS.off[2]));
        int dirty = PyObject_IsTrue(*(PyObject **)((char *)t + C_TRANS.off[3]));
        uint64_t v[2] = {hpa & ~0xFFFULL, (uint64_t)level | (uint64_t)perms << 8 | (uint64_t)dirty << 16};
        map_put(&self->gpa, &gfn, v);
    }
    return t;
}

/* translate(cr3, gva, access, wp, nxe, pscache=True): the 2D walk on this vCPU's caches (the
 * fill's), for tests and the benchmark; None where the fill would hand over to Python. */
static PyObject *Mmu_translate(Mmu *self, PyObject *args)
{
    unsigned long long cr3, gva;
    int access, wp, nxe, use_ps = 1;
    if (!PyArg_ParseTuple(args, "KKipp|p", &cr3, &gva, &access, &wp, &nxe, &use_ps))
        return NULL;
    adlog_t elog = {.n = 0}, glog = {.n = 0};
    res_t r;
    int k = translate(self, cr3, gva, access, wp, nxe, use_ps, &elog, &glog, &r);
    if (flush_adlog(ept_module, &elog) < 0 || flush_adlog(paging_module, &glog) < 0)
        return NULL;
    if (k == RES_FALLBACK)
        Py_RETURN_NONE;
    if (k != RES_OK)
        return ept_result(&r);
    PyObject *v[6] = {PyLong_FromUnsignedLongLong(r.gva), PyLong_FromUnsignedLongLong(r.gpa),
                      PyLong_FromUnsignedLongLong(r.hpa), PyLong_FromLong(r.perms), PyLong_FromLong(r.glevel),
                      PyLong_FromLong(r.level)};
    return cls_new(&C_XL, v);
}

/* fill(vaddr, type): what the TLB-fill callback does for a miss (for tests):
 * (paddr, perms), or None for a refused fill. */
static PyObject *Mmu_fill(Mmu *self, PyObject *args)
{
    unsigned long long vaddr;
    int type;
    if (!PyArg_ParseTuple(args, "Ki", &vaddr, &type))
        return NULL;
    struct uc_tlb_entry e = {0, 0};
    bool ok;
    Py_BEGIN_ALLOW_THREADS
    ok = fill_cb(self->uc, vaddr, type, &e, self);
    Py_END_ALLOW_THREADS
    if (!ok)
        Py_RETURN_NONE;
    return Py_BuildValue("(KI)", (unsigned long long)e.paddr, (unsigned int)e.perms);
}

/* enter(force_py, slicing): before emu_start; nothing recorded yet. */
static PyObject *Mmu_enter(Mmu *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "enter(force_py, slicing)");
        return NULL;
    }
    self->force_py = PyObject_IsTrue(args[0]);
    self->slicing = PyObject_IsTrue(args[1]);
    self->exiting = 0;
    self->fault_kind = 0;
    Py_RETURN_NONE;
}

/* start(force_py, slicing) -> Unicorn's status: enter() and emu_start from RIP (Vcpu.run),
 * without the GIL as the binding runs it (another thread may kick the vCPU; Python hooks take
 * the GIL back); ``rip`` is RIP once it returns. */
static PyObject *Mmu_start(Mmu *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *r = Mmu_enter(self, args, nargs);
    if (!r)
        return NULL;
    Py_DECREF(r);
    uint64_t rip = 0;
    int err = self->reg_read(self->uc, self->reg_rip, &rip);
    if (!err) {
        Py_BEGIN_ALLOW_THREADS
        err = self->emu_start(self->uc, rip, 0, 0, 0);
        Py_END_ALLOW_THREADS
    }
    self->rip = 0;
    self->reg_read(self->uc, self->reg_rip, &self->rip);
    return PyLong_FromLong(err);
}

/* reg(id) -> the value of a register of at most 64 bits (Vcpu._reg_fast): uc_reg_read, with
 * no ctypes in between. */
static PyObject *Mmu_reg(Mmu *self, PyObject *arg)
{
    long id = PyLong_AsLong(arg);
    if (id == -1 && PyErr_Occurred())
        return NULL;
    uint64_t v = 0;
    int err = self->reg_read(self->uc, (int)id, &v);
    if (err) {
        PyErr_Format(PyExc_ValueError, "uc_reg_read(%ld) failed: error %d", id, err);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(v);
}

/* set_reg(id, value): uc_reg_write of a 64-bit register (the value taken modulo 2**64, as
 * ctypes does). */
static PyObject *Mmu_set_reg(Mmu *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "set_reg(id, int)");
        return NULL;
    }
    long id = PyLong_AsLong(args[0]);
    if (id == -1 && PyErr_Occurred())
        return NULL;
    uint64_t v = PyLong_AsUnsignedLongLongMask(args[1]);
    if (v == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    int err = self->reg_write(self->uc, (int)id, &v);
    if (err) {
        PyErr_Format(PyExc_ValueError, "uc_reg_write(%ld) failed: error %d", id, err);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* stop(): uc_emu_stop (a hook ends emulation: Vcpu._exit_now). */
static PyObject *Mmu_stop(Mmu *self, PyObject *unused)
{
    int err = self->emu_stop(self->uc);
    if (err) {
        PyErr_Format(PyExc_ValueError, "uc_emu_stop failed: error %d", err);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* code_bytes(gva, n) -> the n bytes at gva from the page the TLB maps it to, or None when it is
 * not mapped there or they cross the page's end (Vcpu._code_bytes). */
static PyObject *Mmu_code_bytes(Mmu *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t gva, n;
    if (nargs != 2 || get_u64(args[0], &gva) < 0 || get_u64(args[1], &n) < 0)
        return NULL;
    uint64_t page = gva & ~0xFFFULL, off = gva & 0xFFF, *c = map_get(&self->tlb, &page);
    if (!c || off + n > 0x1000 || (c[0] + 0x1000) > self->h.nwords * 8)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)self->h.q + c[0] + off, (Py_ssize_t)n);
}

/* take_fault() -> (the exit's object, GVA page, access) recorded by a refused fill. */
static PyObject *Mmu_take_fault(Mmu *self, PyObject *unused)
{
    if (!self->fault_kind)
        Py_RETURN_NONE;
    self->fault_kind = 0;
    PyObject *o = ept_result(&self->fault);
    if (!o)
        return NULL;
    return Py_BuildValue("(NKi)", o, (unsigned long long)self->fault_gla, self->fault_access);
}

static PyObject *Mmu_gpa_items(Mmu *self, PyObject *unused)
{
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (size_t i = 0; i < self->gpa.nrec; i++) {
        if (!self->gpa.live[i])
            continue;
        uint64_t *r = map_rec(&self->gpa, i);
        PyObject *it = Py_BuildValue("(K(KiiO))", (unsigned long long)r[0], (unsigned long long)r[1],
                                     (int)(r[2] & 0xFF), (int)((r[2] >> 8) & 0xFF),
                                     (r[2] >> 16) & 1 ? Py_True : Py_False);
        if (!it || PyList_Append(out, it) < 0) {
            Py_XDECREF(it);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(it);
    }
    return out;
}

static PyObject *Mmu_gpa_get(Mmu *self, PyObject *arg)
{
    uint64_t gfn;
    if (get_u64(arg, &gfn) < 0)
        return NULL;
    uint64_t *c = map_get(&self->gpa, &gfn);
    if (!c)
        Py_RETURN_NONE;
    return Py_BuildValue("(KiiO)", (unsigned long long)c[0], (int)(c[1] & 0xFF), (int)((c[1] >> 8) & 0xFF),
                         (c[1] >> 16) & 1 ? Py_True : Py_False);
}

static PyObject *Mmu_gpa_put(Mmu *self, PyObject *args)
{
    unsigned long long gfn, hpa;
    int level, perms, dirty;
    if (!PyArg_ParseTuple(args, "KKiip", &gfn, &hpa, &level, &perms, &dirty))
        return NULL;
    uint64_t k = gfn, v[2] = {hpa, (uint64_t)level | (uint64_t)perms << 8 | (uint64_t)dirty << 16};
    if (map_put(&self->gpa, &k, v) < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *Mmu_tlb_items(Mmu *self, PyObject *unused)
{
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (size_t i = 0; i < self->tlb.nrec; i++) {
        if (!self->tlb.live[i])
            continue;
        uint64_t *r = map_rec(&self->tlb, i);
        PyObject *it = Py_BuildValue("(KK)", (unsigned long long)r[0], (unsigned long long)r[1]);
        if (!it || PyList_Append(out, it) < 0) {
            Py_XDECREF(it);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(it);
    }
    return out;
}

static PyObject *Mmu_tlb_get(Mmu *self, PyObject *arg)
{
    uint64_t gva;
    if (get_u64(arg, &gva) < 0)
        return NULL;
    uint64_t *c = map_get(&self->tlb, &gva);
    if (!c)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(c[0]);
}

static PyObject *Mmu_tlb_put(Mmu *self, PyObject *args)
{
    unsigned long long gva, hpa;
    if (!PyArg_ParseTuple(args, "KK", &gva, &hpa))
        return NULL;
    uint64_t k = gva, v = hpa;
    if (map_put(&self->tlb, &k, &v) < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* take_code() -> the host pfns the fill logged as filled executable since the last call. */
static PyObject *Mmu_take_code(Mmu *self, PyObject *unused)
{
    PyObject *out = PyList_New(self->ncode);
    if (!out)
        return NULL;
    for (int i = 0; i < self->ncode; i++) {
        PyObject *p = PyLong_FromUnsignedLongLong(self->code_log[i]);
        if (!p) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, p);
    }
    self->ncode = 0;
    return out;
}

/* scanned(gva_page, hpa_page, bits): the Python side hooked that code page's exit sites (1)
 * or PAUSEs (2). */
static PyObject *Mmu_scanned(Mmu *self, PyObject *args)
{
    unsigned long long gva, hpa, bits;
    if (!PyArg_ParseTuple(args, "KKK", &gva, &hpa, &bits))
        return NULL;
    uint64_t k[2] = {gva, hpa}, *old = map_get(&self->scanned, k), v = bits | (old ? *old : 0);
    if (map_put(&self->scanned, k, &v) < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* getstate()/setstate(): what emu.checkers.inplace puts back after a run (the caches are
 * flushed then, as the TLB is; the scanned pages stay, as Unicorn's hooks do). */
static PyObject *Mmu_getstate(Mmu *self, PyObject *unused)
{
    return Py_BuildValue("(Kiii)", self->fills, self->exiting, self->force_py, self->slicing);
}

static PyObject *Mmu_setstate(Mmu *self, PyObject *args)
{
    unsigned long long fills;
    int exiting, force_py, slicing;
    if (!PyArg_ParseTuple(args, "(Kiii)", &fills, &exiting, &force_py, &slicing))
        return NULL;
    self->fills = fills; self->exiting = exiting; self->force_py = force_py; self->slicing = slicing;
    self->fault_kind = 0;
    Py_RETURN_NONE;
}

static PyMethodDef Mmu_methods[] = {
    {"set_eptp", (PyCFunction)Mmu_set_eptp, METH_VARARGS, NULL},
    {"flush", (PyCFunction)Mmu_flush, METH_NOARGS, NULL},
    {"clear_gpa", (PyCFunction)Mmu_clear_gpa, METH_NOARGS, NULL},
    {"ept", (PyCFunction)(void (*)(void))Mmu_ept, METH_FASTCALL, NULL},
    {"translate", (PyCFunction)Mmu_translate, METH_VARARGS, NULL},
    {"fill", (PyCFunction)Mmu_fill, METH_VARARGS, NULL},
    {"enter", (PyCFunction)(void (*)(void))Mmu_enter, METH_FASTCALL, NULL},
    {"start", (PyCFunction)(void (*)(void))Mmu_start, METH_FASTCALL, NULL},
    {"code_bytes", (PyCFunction)(void (*)(void))Mmu_code_bytes, METH_FASTCALL, NULL},
    {"reg", (PyCFunction)Mmu_reg, METH_O, NULL},
    {"stop", (PyCFunction)Mmu_stop, METH_NOARGS, NULL},
    {"set_reg", (PyCFunction)(void (*)(void))Mmu_set_reg, METH_FASTCALL, NULL},
    {"take_fault", (PyCFunction)Mmu_take_fault, METH_NOARGS, NULL},
    {"gpa_items", (PyCFunction)Mmu_gpa_items, METH_NOARGS, NULL},
    {"gpa_get", (PyCFunction)Mmu_gpa_get, METH_O, NULL},
    {"gpa_put", (PyCFunction)Mmu_gpa_put, METH_VARARGS, NULL},
    {"tlb_items", (PyCFunction)Mmu_tlb_items, METH_NOARGS, NULL},
    {"tlb_get", (PyCFunction)Mmu_tlb_get, METH_O, NULL},
    {"tlb_put", (PyCFunction)Mmu_tlb_put, METH_VARARGS, NULL},
    {"take_code", (PyCFunction)Mmu_take_code, METH_NOARGS, NULL},
    {"scanned", (PyCFunction)Mmu_scanned, METH_VARARGS, NULL},
    {"getstate", (PyCFunction)Mmu_getstate, METH_NOARGS, NULL},
    {"setstate", (PyCFunction)Mmu_setstate, METH_VARARGS, NULL},
    {NULL}
};

static PyMemberDef Mmu_members[] = {
    {"fills", T_ULONGLONG, offsetof(Mmu, fills), 0, NULL},
    {"exiting", T_INT, offsetof(Mmu, exiting), 0, NULL},
    {"fault", T_INT, offsetof(Mmu, fault_kind), READONLY, NULL},
    {"code_logged", T_INT, offsetof(Mmu, ncode), READONLY, NULL},
    {"rip", T_ULONGLONG, offsetof(Mmu, rip), READONLY, NULL},
    {NULL}
};

static PyTypeObject MmuType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "emu.hw._mmu.Mmu",
    .tp_doc = "The compiled MMU of one vCPU: its caches and its TLB-fill callback.",
    .tp_basicsize = sizeof(Mmu),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Mmu_init,
    .tp_dealloc = (destructor)Mmu_dealloc,
    .tp_traverse = (traverseproc)Mmu_traverse,
    .tp_clear = (inquiry)Mmu_clear,
    .tp_methods = Mmu_methods,
    .tp_members = Mmu_members,
};

/* ---------------------------------------------------------------------------------------- */
/* Module functions */

/* walk(mem, eptp, gpa, access, path=None, set_ad=True): ept.walk, compiled.  A path to
 * record, and anything the compiled walk does not decide, go to the Python walk. */
static PyObject *fallback(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return PyObject_Vectorcall(walk_py, args, nargs, kwnames);
}

static PyObject *mod_walk(PyObject *mod, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs < 4 || nargs > 6 || !walk_py)
        return fallback(args, nargs, kwnames);
    int set_ad = 1;
    if (nargs >= 5 && args[4] != Py_None)
        return fallback(args, nargs, kwnames);
    if (nargs == 6 && (set_ad = PyObject_IsTrue(args[5])) < 0)
        return NULL;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i), *v = args[nargs + i];
        if (PyUnicode_CompareWithASCIIString(name, "set_ad") == 0) {
            if ((set_ad = PyObject_IsTrue(v)) < 0)
                return NULL;
        } else if (PyUnicode_CompareWithASCIIString(name, "path") != 0 || v != Py_None) {
            return fallback(args, nargs, kwnames);
        }
    }
    hostmem_t h;
    uint64_t eptp, gpa;
    if (!PyLong_Check(args[1]) || !PyLong_Check(args[2]) || !PyLong_Check(args[3]))
        return fallback(args, nargs, kwnames);
    if (mem_of(args[0], &h) < 0 || get_u64(args[1], &eptp) < 0 || get_u64(args[2], &gpa) < 0) {
        PyErr_Clear();
        return fallback(args, nargs, kwnames);
    }
    long access = PyLong_AsLong(args[3]);
    if (access == -1 && PyErr_Occurred())
        return NULL;
    eptp_t p = decode_eptp(eptp);
    if (!p.valid)
        return fallback(args, nargs, kwnames);
    adlog_t log = {.n = 0};
    res_t r;
    int k = ept_walk(&h, &p, gpa, (int)access, set_ad, &log, &r);
    if (k == RES_FALLBACK)
        return fallback(args, nargs, kwnames);
    if (log.n && flush_adlog(ept_module, &log) < 0)
        return NULL;
    return ept_result(&r);
}

#define CLS(mod, name, spec, names)                                                              \
    if (!(c = PyObject_GetAttrString(mod, name)) || cls_init(&spec, c, names) < 0) {             \
        Py_XDECREF(c);                                                                           \
        return NULL;                                                                             \
    }                                                                                            \
    Py_DECREF(c);

static long width_of(PyObject *mod, const char *name)
{
    PyObject *o = PyObject_GetAttrString(mod, name);
    if (!o)
        return -1;
    long n = PyLong_AsLong(o);
    Py_DECREF(o);
    if (n < 36 || n > 52) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "setup: %s out of range", name);
        return -1;
    }
    return n;
}

/* setup(ept module, its Python walk): as emu/hw/ept.py's import ends. */
static PyObject *mod_setup(PyObject *mod, PyObject *args)
{
    PyObject *ept, *walk, *c;
    if (!PyArg_ParseTuple(args, "OO", &ept, &walk))
        return NULL;
    static const char *const trans[] = {"hpa", "level", "perms", "dirty", NULL};
    static const char *const viol[] = {"gpa", "qualification", "suppress_ve", NULL};
    CLS(ept, "EptTranslation", C_TRANS, trans)
    CLS(ept, "EptViolation", C_VIOL, viol)
    long n = width_of(ept, "MAXPHYADDR");
    if (n < 0)
        return NULL;
    ADDR_MASK = ((1ULL << n) - 1) & ~0xFFFULL;
    RSVD_HIGH = ((1ULL << 52) - 1) & ~((1ULL << n) - 1);
    EPTP_RSVD = 0xF00ULL | RSVD_HIGH | (0xFFFULL << 52);
    Py_XSETREF(misconfig_py, PyObject_GetAttrString(ept, "_misconfig"));
    if (!misconfig_py)
        return NULL;
    Py_XSETREF(walk_py, Py_NewRef(walk));
    Py_XSETREF(ept_module, Py_NewRef(ept));
    Py_RETURN_NONE;
}

/* setup_paging(paging module): as emu/hw/paging.py's import ends (the 2D walk's classes). */
static PyObject *mod_setup_paging(PyObject *mod, PyObject *args)
{
    PyObject *paging, *c;
    if (!PyArg_ParseTuple(args, "O", &paging))
        return NULL;
    static const char *const pf[] = {"gva", "error_code", NULL};
    static const char *const gp[] = {"gva", NULL};
    static const char *const xl[] = {"gva", "gpa", "hpa", "perms", "level", "ept_level", NULL};
    CLS(paging, "PageFault", C_PF, pf)
    CLS(paging, "GeneralProtection", C_GP, gp)
    CLS(paging, "Translation", C_XL, xl)
    long gn = width_of(paging, "GUEST_MAXPHYADDR");
    if (gn < 0)
        return NULL;
    PT_ADDR = ((1ULL << gn) - 1) & ~0xFFFULL;
    PT_RSVD_HIGH = ((1ULL << 52) - 1) & ~((1ULL << gn) - 1);
    Py_XSETREF(paging_module, Py_NewRef(paging));
    Py_RETURN_NONE;
}
#undef CLS

static PyObject *mod_fill_callback(PyObject *mod, PyObject *unused)
{
    return PyLong_FromVoidPtr((void *)fill_cb);
}

static PyMethodDef mod_methods[] = {
    {"walk", (PyCFunction)(void (*)(void))mod_walk, METH_FASTCALL | METH_KEYWORDS,
     "walk(mem, eptp, gpa, access, path=None, set_ad=True): emu.hw.ept.walk, compiled"},
    {"setup", (PyCFunction)mod_setup, METH_VARARGS, "setup(ept module, its Python walk)"},
    {"setup_paging", (PyCFunction)mod_setup_paging, METH_VARARGS, "setup_paging(paging module)"},
    {"fill_callback", (PyCFunction)mod_fill_callback, METH_NOARGS,
     "the address of the UC_HOOK_TLB_FILL callback (user data: an Mmu)"},
    {NULL}
};

static struct PyModuleDef mmu_module = {
    PyModuleDef_HEAD_INIT, "emu.hw._mmu", "The compiled hardware MMU (emu/hw/mmu.c).", -1, mod_methods,
};

PyMODINIT_FUNC PyInit__mmu(void)
{
    if (PyType_Ready(&MmuType) < 0)
        return NULL;
    str_AD_LOG = PyUnicode_InternFromString("AD_LOG");
    str_base_address = PyUnicode_InternFromString("base_address");
    str_size = PyUnicode_InternFromString("size");
    if (!str_AD_LOG || !str_base_address || !str_size)
        return NULL;
    PyObject *m = PyModule_Create(&mmu_module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Mmu", (PyObject *)&MmuType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
