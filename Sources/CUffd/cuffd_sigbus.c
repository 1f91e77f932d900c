// In-thread fault resolution: the SIGBUS handler, its lock-free range table, and chaining to
// the action installed before us. Everything reachable from the handler is async-signal-safe:
// atomics, ioctl, pread, sigprocmask, sigaction, no allocation, no locks.
#include "CUffd.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

// A slot's life: FREE -> SETUP (being written by add) -> ACTIVE -> RETIRED (removed; its address
// range stays as a tombstone, so a signal raised before the removal retries the access) -> SETUP.
enum { SLOT_FREE = 0, SLOT_SETUP, SLOT_ACTIVE, SLOT_RETIRED };

_Static_assert(CUFFD_OP_POISON < 8 && CUFFD_OP_UNPROTECT < 8 && CUFFD_OP_WAKE < 8,
               "cuffd_sigbus_stats.ops[8] is indexed by the ops the resolver performs");

// Consecutive SIGBUS on one page of one thread after which the signal is delivered instead of
// resolved again: a resolution that does not stick (an unregistered range over a truncated
// file, a WP fault the policy cannot answer) must not turn into an endless SIGBUS loop.
#define LOOP_LIMIT 4

struct slot {
    _Atomic uint32_t state;
    _Atomic uint32_t busy;      // handlers using the slot's resources right now
    _Atomic uint64_t start;     // relaxed reads: a filter; the state decides
    _Atomic uint64_t end;
    struct cuffd_sigbus_range r; // written only in SETUP
    uint64_t ps;
    char *scratch;               // FILE: r.scratch_pages pages; hugetlb: one more, all zero
    uint64_t scratch_len;
    char *zero;                  // hugetlb: a page of zeros for ZEROPAGE (UFFDIO_ZEROPAGE is refused there)
    _Atomic uint64_t scratch_free; // bit i set: scratch page i is free
    // Pages this range poisoned. In SIGBUS mode the kernel reports an access to a poison marker
    // with the same BUS_ADRERR as a missing page, and COPY/ZEROPAGE would fill over the marker:
    // the resolver remembers its poisoned pages and delivers their signals instead.
    _Atomic uint32_t npoisoned;
    _Atomic uint64_t poisoned[CUFFD_SIGBUS_MAX_POISONED];
    struct {
        _Atomic uint64_t signals, resolved, existed, gone, retries, fallbacks, delivered,
            loop_breaks, bytes, ops[8], poisoned_hits;
        _Atomic int32_t first_error;
        struct {
            _Atomic uint64_t count, sum, min, max, buckets[CUFFD_SIGBUS_LAT_BUCKETS];
        } lat;
    } st;
} __attribute__((aligned(64)));

static struct slot slots[CUFFD_SIGBUS_MAX_RANGES];
static _Atomic uint32_t nslots_used; // high-water mark of slots ever used (the handler scans these)
static _Atomic uint64_t base_ps;     // the base page size (set by add)
static _Atomic uint32_t timed_ranges; // active ranges with CUFFD_SIGBUS_LATENCY: 0 -> no clock read at entry
static _Atomic int active;           // 1: resolving; 0: pass-through
static _Atomic int installed;        // our action is (or was last) put in place by us
static struct sigaction previous;    // the action we replaced; read by the handler
static _Atomic int previous_reset;   // the previous action had SA_RESETHAND and was used: act as SIG_DFL
static pthread_mutex_t admin = PTHREAD_MUTEX_INITIALIZER; // add/remove/install (never the handler)
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static struct {
    _Atomic uint64_t signals, chained, retired;
} gst;

// The per-thread loop guard; initial-exec TLS: no allocation on first touch in a signal handler.
static __thread __attribute__((tls_model("initial-exec"))) uint64_t guard_page;
static __thread __attribute__((tls_model("initial-exec"))) uint32_t guard_count;
// Where this thread is inside chain(): a deeper entry of the handler comes from the chained action.
static __thread __attribute__((tls_model("initial-exec"))) uintptr_t chain_sp;

static inline void inc(_Atomic uint64_t *c, uint64_t n) { atomic_fetch_add_explicit(c, n, memory_order_relaxed); }

static void note_error(struct slot *s, int err) {
    int32_t zero = 0;
    atomic_compare_exchange_strong_explicit(&s->st.first_error, &zero, err, memory_order_relaxed,
                                            memory_order_relaxed);
}

// MARK: - Latency ------------------------------------------------------------------------------

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); // async-signal-safe (POSIX); a vDSO read here
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#define LAT_SUB (1u << CUFFD_SIGBUS_LAT_SUB_BITS)

unsigned cuffd_sigbus_latency_bucket_of(uint64_t ns) {
    if (ns < LAT_SUB) return (unsigned)ns;
    unsigned e = 63u - (unsigned)__builtin_clzll(ns); // ns in [2^e, 2^(e+1)), e >= SUB_BITS
    if (e >= CUFFD_SIGBUS_LAT_MAX_EXP) return CUFFD_SIGBUS_LAT_BUCKETS - 1;
    unsigned sub = (unsigned)(ns >> (e - CUFFD_SIGBUS_LAT_SUB_BITS)) & (LAT_SUB - 1);
    return LAT_SUB + (e - CUFFD_SIGBUS_LAT_SUB_BITS) * LAT_SUB + sub;
}

uint64_t cuffd_sigbus_latency_bucket_upper(unsigned i) {
    if (i < LAT_SUB) return i;
    if (i >= CUFFD_SIGBUS_LAT_BUCKETS - 1) return UINT64_MAX; // also holds everything longer
    unsigned k = i - LAT_SUB, shift = k / LAT_SUB;
    uint64_t lower = (uint64_t)(LAT_SUB + k % LAT_SUB) << shift;
    return lower + ((uint64_t)1 << shift) - 1;
}

uint64_t cuffd_sigbus_latency_percentile(const struct cuffd_sigbus_latency *l, double p) {
    if (!l->count) return 0;
    if (p >= 100) return l->max_ns;
    double want = p / 100.0 * (double)l->count;
    uint64_t rank = (uint64_t)want;
    if ((double)rank < want) rank++;
    if (rank < 1) rank = 1;
    uint64_t seen = 0, v = l->max_ns; // (a rank the buckets do not reach: samples in flight)
    for (unsigned i = 0; i < CUFFD_SIGBUS_LAT_BUCKETS; i++) {
        seen += l->buckets[i];
        if (seen >= rank) {
            v = cuffd_sigbus_latency_bucket_upper(i);
            break;
        }
    }
    if (v > l->max_ns) v = l->max_ns;
    if (v < l->min_ns) v = l->min_ns;
    return v;
}

// One sample: five relaxed atomics in the common case (min/max only CAS when they move).
static void record_latency(struct slot *s, uint64_t ns) {
    inc(&s->st.lat.buckets[cuffd_sigbus_latency_bucket_of(ns)], 1);
    inc(&s->st.lat.count, 1);
    inc(&s->st.lat.sum, ns);
    uint64_t m = atomic_load_explicit(&s->st.lat.max, memory_order_relaxed);
    while (ns > m && !atomic_compare_exchange_weak_explicit(&s->st.lat.max, &m, ns, memory_order_relaxed,
                                                             memory_order_relaxed)) {}
    m = atomic_load_explicit(&s->st.lat.min, memory_order_relaxed);
    while (ns < m && !atomic_compare_exchange_weak_explicit(&s->st.lat.min, &m, ns, memory_order_relaxed,
                                                             memory_order_relaxed)) {}
}

// MARK: - Performing ---------------------------------------------------------------------------

// Every filling verb's DONTWAKE is bit 0; in SIGBUS mode nobody sleeps on the range, and a
// DONTWAKE from a custom policy would only matter to fd-mode waiters of a shared range.
#define VERB_DONTWAKE ((uint64_t)1 << 0)

// A scratch page of the slot (FILE): claimed with one atomic; spins (yielding) when every page
// is in use by other faulting threads, which each hold one for one pread + COPY.
static int scratch_claim(struct slot *s) {
    for (unsigned spins = 0; spins < 1000000; spins++) {
        uint64_t f = atomic_load_explicit(&s->scratch_free, memory_order_relaxed);
        while (f) {
            int i = __builtin_ctzll(f);
            if (atomic_compare_exchange_weak_explicit(&s->scratch_free, &f, f & ~(1ull << i),
                                                      memory_order_acquire, memory_order_relaxed))
                return i;
        }
        sched_yield();
    }
    return -EAGAIN;
}

static void scratch_release(struct slot *s, int i) {
    atomic_fetch_or_explicit(&s->scratch_free, 1ull << i, memory_order_release);
}

// ZEROPAGE for this slot: UFFDIO_ZEROPAGE, or a COPY of zeros where the kernel has no zero
// page to map (hugetlb).
static int zero_fill(struct slot *s, uint64_t dst, uint64_t len, int64_t *done) {
    if (s->zero) return cuffd_copy(s->r.uffd, dst, (uint64_t)(uintptr_t)s->zero, len, 0, done);
    return cuffd_zeropage(s->r.uffd, dst, len, 0, done);
}

static bool is_poisoned(struct slot *s, uint64_t page) {
    uint32_t n = atomic_load_explicit(&s->npoisoned, memory_order_acquire);
    if (n > CUFFD_SIGBUS_MAX_POISONED) n = CUFFD_SIGBUS_MAX_POISONED;
    for (uint32_t i = 0; i < n; i++)
        if (atomic_load_explicit(&s->poisoned[i], memory_order_relaxed) == page) return true;
    return false;
}

// UFFDIO_POISON on one resolution unit, remembered; -ENOSPC when the set is full (the signal is
// delivered instead: a poison we could not remember would be filled over on the next fault).
static int poison_page(struct slot *s, uint64_t page, uint64_t len, int64_t *done) {
    *done = 0;
    if (is_poisoned(s, page)) return -EEXIST;
    uint32_t i = atomic_fetch_add_explicit(&s->npoisoned, 1, memory_order_relaxed);
    if (i >= CUFFD_SIGBUS_MAX_POISONED) {
        atomic_fetch_sub_explicit(&s->npoisoned, 1, memory_order_relaxed);
        return -ENOSPC;
    }
    int rc = cuffd_poison(s->r.uffd, page, len, 0, done);
    // Remembered either way: a partial poison leaves markers too.
    atomic_store_explicit(&s->poisoned[i], page, memory_order_release);
    return rc;
}

static int perform(struct slot *s, const struct cuffd_resolution *r, int64_t *done) {
    uint64_t mode = r->mode & ~VERB_DONTWAKE;
    int fd = s->r.uffd;
    *done = 0;
    switch (r->op) {
    case CUFFD_OP_COPY: return cuffd_copy(fd, r->dst, r->src, r->len, mode, done);
    case CUFFD_OP_ZEROPAGE: return zero_fill(s, r->dst, r->len, done);
    case CUFFD_OP_MOVE: return cuffd_move(fd, r->dst, r->src, r->len, mode, done);
    case CUFFD_OP_CONTINUE: return cuffd_continue(fd, r->dst, r->len, mode, done);
    case CUFFD_OP_POISON: return poison_page(s, r->dst, r->len, done);
    case CUFFD_OP_UNPROTECT: {
        int rc = cuffd_writeprotect(fd, r->dst, r->len, false, false);
        if (rc == 0) *done = (int64_t)r->len;
        return rc;
    }
    case CUFFD_OP_WAKE: return 0; // nothing sleeps in SIGBUS mode: the access is simply retried
    default: return -EINVAL;
    }
}

// FILE: pread the page into a scratch page (zeros past EOF), then COPY.
static int file_copy(struct slot *s, uint64_t page, int64_t *done) {
    *done = 0;
    int i = scratch_claim(s);
    if (i < 0) return i;
    char *buf = s->scratch + (uint64_t)i * s->ps;
    uint64_t off = s->r.file_offset + (page - s->r.start), got = 0;
    int rc = 0;
    while (got < s->ps) {
        ssize_t n = pread(s->r.file_fd, buf + got, s->ps - got, (off_t)(off + got));
        if (n > 0) {
            got += (uint64_t)n;
        } else if (n == 0) {
            memset(buf + got, 0, s->ps - got);
            got = s->ps;
        } else if (errno != EINTR) {
            rc = -errno;
            break;
        }
    }
    if (rc == 0) rc = cuffd_copy(s->r.uffd, page, (uint64_t)(uintptr_t)buf, s->ps, s->r.mode & ~VERB_DONTWAKE, done);
    scratch_release(s, i);
    return rc;
}

// O_RETRY: nothing was mapped and nothing failed (a wake): the access is simply retried.
enum outcome { O_RESOLVED, O_EXISTED, O_GONE, O_FALLBACK, O_FAILED, O_RETRY };

// Runs one op with the outcome model: EAGAIN retried (bounded), EEXIST done, ENOENT/ESRCH gone.
// A MOVE whose donor page is a hole (moved before, or dropped since) maps zeros instead.
static int run_op(struct slot *s, const struct cuffd_resolution *r, bool file, int64_t *done, int *err) {
    for (int tries = 0;; tries++) {
        int rc = file ? file_copy(s, r->dst, done) : perform(s, r, done);
        if (rc == -EAGAIN && tries < 1000) {
            inc(&s->st.retries, 1);
            sched_yield();
            continue;
        }
        if (rc == -ENOENT && r->op == CUFFD_OP_MOVE) {
            rc = zero_fill(s, r->dst, r->len, done);
            if (rc == 0) inc(&s->st.ops[CUFFD_OP_ZEROPAGE], 1);
        } else if (rc == 0) {
            inc(&s->st.ops[r->op < 8 ? r->op : 0], 1);
        }
        *err = -rc;
        switch (rc) {
        case 0: return r->op == CUFFD_OP_WAKE ? O_RETRY : O_RESOLVED;
        case -EEXIST: return O_EXISTED;
        case -ENOENT:
        case -ESRCH: return O_GONE;
        default: return O_FAILED;
        }
    }
}

// The resolution the range's policy asks for at `page`; 0 or -errno (CUSTOM gave up).
static int decide(struct slot *s, uint64_t addr, uint64_t page, struct cuffd_resolution *r, bool *file) {
    memset(r, 0, sizeof *r);
    r->dst = page;
    r->len = s->ps;
    r->mode = s->r.mode;
    *file = false;
    switch (s->r.policy) {
    case CUFFD_SIGBUS_COPY: r->op = CUFFD_OP_COPY; r->src = s->r.src + (page - s->r.start); return 0;
    case CUFFD_SIGBUS_FILE: r->op = CUFFD_OP_COPY; *file = true; return 0;
    case CUFFD_SIGBUS_ZEROPAGE: r->op = CUFFD_OP_ZEROPAGE; return 0;
    case CUFFD_SIGBUS_MOVE: r->op = CUFFD_OP_MOVE; r->src = s->r.src + (page - s->r.start); return 0;
    case CUFFD_SIGBUS_CONTINUE: r->op = CUFFD_OP_CONTINUE; return 0;
    case CUFFD_SIGBUS_POISON: r->op = CUFFD_OP_POISON; return 0;
    case CUFFD_SIGBUS_CUSTOM: {
        int rc = s->r.decide(s->r.ctx, addr, r);
        if (rc < 0) return rc;
        // A range that does not hold the faulting page cannot release the thread: the fallback
        // acts on the faulting page instead.
        if (!r->len || ((r->dst | r->len) & (s->ps - 1)) || addr < r->dst || addr - r->dst >= r->len)
            return -EINVAL;
        if (r->op == CUFFD_OP_NONE || r->op == CUFFD_OP_FAIL || r->op >= CUFFD_OP_COUNT) return -EIO;
        // Nobody would finish a deferred fault: the faulting thread is the resolver.
        if (r->op == CUFFD_OP_DEFER) return -EOPNOTSUPP;
        return 0;
    }
    default: return -EINVAL;
    }
}

// Resolves the fault at addr in slot s. Returns an outcome; O_FAILED means "deliver the signal".
static int resolve(struct slot *s, uint64_t addr) {
    uint64_t page = addr & ~(s->ps - 1);
    struct cuffd_resolution r;
    bool file;
    int64_t done = 0;
    int err = 0, o;
    if (atomic_load_explicit(&s->npoisoned, memory_order_relaxed) && is_poisoned(s, page)) {
        inc(&s->st.poisoned_hits, 1);
        return O_FAILED;
    }
    int rc = decide(s, addr, page, &r, &file);
    if (rc == 0) {
        o = run_op(s, &r, file, &done, &err);
        if (o != O_FAILED) {
            if (o == O_RESOLVED) {
                inc(&s->st.resolved, 1);
                inc(&s->st.bytes, (uint64_t)done);
            } else if (o != O_RETRY) {
                inc(o == O_EXISTED ? &s->st.existed : &s->st.gone, 1);
            }
            return o;
        }
    } else {
        err = -rc;
    }
    note_error(s, err ? err : EIO);
    // The fallback acts on the faulting page only.
    struct cuffd_resolution fb = {.dst = page, .len = s->ps};
    switch (s->r.fallback) {
    case CUFFD_SIGBUS_FALLBACK_ZEROPAGE: fb.op = CUFFD_OP_ZEROPAGE; break;
    case CUFFD_SIGBUS_FALLBACK_POISON: fb.op = CUFFD_OP_POISON; break;
    default: inc(&s->st.delivered, 1); return O_FAILED;
    }
    o = run_op(s, &fb, false, &done, &err);
    if (o == O_RESOLVED || o == O_EXISTED) {
        inc(&s->st.fallbacks, 1);
        if (o == O_RESOLVED) inc(&s->st.bytes, (uint64_t)done);
        return O_FALLBACK;
    }
    if (o == O_GONE) {
        inc(&s->st.gone, 1);
        return O_GONE;
    }
    inc(&s->st.delivered, 1);
    return O_FAILED;
}

// MARK: - Chaining -----------------------------------------------------------------------------

// Faults the kernel forces on the thread (the default action even when ignored).
static bool refaults(int code) {
    return code == BUS_ADRERR || code == BUS_ADRALN || code == BUS_OBJERR || code == BUS_MCEERR_AR;
}

static void deliver_default(siginfo_t *info) {
    // Block SIGBUS, put the default action back and queue the same siginfo to this thread: when
    // the handler returns, sigreturn unblocks it and the default action takes it at the faulting
    // instruction (the core dump shows the fault, not this handler). Never a return to a retry
    // that could succeed by chance with our action gone.
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGBUS);
    pthread_sigmask(SIG_BLOCK, &m, NULL);
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGBUS, &dfl, NULL);
    syscall(SYS_rt_tgsigqueueinfo, getpid(), (pid_t)syscall(SYS_gettid), SIGBUS, info);
}

// Passes the signal on exactly as the kernel would have delivered it to the previous action:
// its handler with its mask (and SIGBUS blocked unless SA_NODEFER), SA_RESETHAND honoured;
// SIG_IGN ignores only signals the kernel would not force (a fault is forced: default action).
static void chain(int sig, siginfo_t *info, void *uc) {
    const struct sigaction *p = &previous;
    bool reset = atomic_load_explicit(&previous_reset, memory_order_relaxed);
    void (*h)(int) = reset ? SIG_DFL : p->sa_handler;
    if (h == SIG_DFL || (h == SIG_IGN && info->si_code > 0 && refaults(info->si_code))) {
        deliver_default(info);
        return;
    }
    if (h == SIG_IGN) return;
    if (p->sa_flags & SA_RESETHAND) atomic_store_explicit(&previous_reset, 1, memory_order_relaxed);
    sigset_t mask, old;
    mask = p->sa_mask;
    if (!(p->sa_flags & SA_NODEFER)) sigaddset(&mask, sig);
    pthread_sigmask(SIG_BLOCK, &mask, &old);
    uintptr_t outer = chain_sp;
    chain_sp = (uintptr_t)__builtin_frame_address(0);
    if (p->sa_flags & SA_SIGINFO)
        p->sa_sigaction(sig, info, uc);
    else
        h(sig);
    chain_sp = outer; // (not reached when the action jumps out: a later entry is higher on the stack)
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

// MARK: - The handler --------------------------------------------------------------------------

// The active slot whose range holds addr, with its busy count taken; NULL when none. *retired
// is set when the address is only in a removed range's tombstone. Only the matching slot's
// counters are touched: the scan itself reads bounds and states (relaxed: a filter; the state
// read after taking the busy count decides).
static struct slot *lookup(uint64_t addr, bool *retired) {
    uint32_t n = atomic_load_explicit(&nslots_used, memory_order_acquire);
    bool resolving = atomic_load_explicit(&active, memory_order_acquire);
    bool tomb = false;
    *retired = false;
    for (uint32_t i = 0; i < n; i++) {
        struct slot *s = &slots[i];
        if (addr < atomic_load_explicit(&s->start, memory_order_relaxed) ||
            addr >= atomic_load_explicit(&s->end, memory_order_relaxed))
            continue;
        uint32_t st = atomic_load_explicit(&s->state, memory_order_relaxed);
        if (st == SLOT_RETIRED || st == SLOT_SETUP) tomb = true; // SETUP: a tombstone being reused
        // Uninstalled (pass-through): a range still in the table is not resolved any more.
        if (st != SLOT_ACTIVE || !resolving) continue;
        atomic_fetch_add_explicit(&s->busy, 1, memory_order_seq_cst);
        if (atomic_load_explicit(&s->state, memory_order_seq_cst) == SLOT_ACTIVE &&
            addr >= atomic_load_explicit(&s->start, memory_order_relaxed) &&
            addr < atomic_load_explicit(&s->end, memory_order_relaxed))
            return s;
        atomic_fetch_sub_explicit(&s->busy, 1, memory_order_release);
    }
    *retired = tomb;
    return NULL;
}

static void on_sigbus(int sig, siginfo_t *info, void *uc) {
    int saved_errno = errno;
    // The lookup is part of serving the fault: the clock is read first, unless no range is timed.
    uint64_t entered = atomic_load_explicit(&timed_ranges, memory_order_relaxed) ? now_ns() : 0;
    inc(&gst.signals, 1);
    // Ours only: a fault the kernel raised for a missing/minor page (BUS_ADRERR) at an address
    // in a range of the table, while we are resolving.
    if (info->si_code != BUS_ADRERR) goto not_ours;
    uint64_t addr = (uint64_t)(uintptr_t)info->si_addr;
    bool retired;
    struct slot *s = lookup(addr, &retired);
    if (!s && !retired) goto not_ours;

    uint64_t page = addr & ~((s ? s->ps : atomic_load_explicit(&base_ps, memory_order_relaxed)) - 1);
    bool repeat = page == guard_page;
    if (repeat && guard_count >= LOOP_LIMIT) {
        guard_count = 0;
        guard_page = 0;
        if (s) {
            inc(&s->st.signals, 1);
            inc(&s->st.loop_breaks, 1);
            atomic_fetch_sub_explicit(&s->busy, 1, memory_order_release);
        }
        goto deliver;
    }
    int o = O_RETRY;
    if (s) {
        inc(&s->st.signals, 1);
        bool timed = s->r.flags & CUFFD_SIGBUS_LATENCY;
        if (timed && !entered) entered = now_ns(); // the range was added after the entry's check
        o = resolve(s, addr);
        // Before releasing the slot: the stats hold the sample once a removal returns.
        if (timed) record_latency(s, now_ns() - entered);
        atomic_fetch_sub_explicit(&s->busy, 1, memory_order_release);
        if (o == O_FAILED) goto deliver;
    } else {
        // Raised before its range was removed: retry the access (the range is normally
        // unregistered by now, so it succeeds; if not, the loop guard delivers it).
        inc(&gst.retired, 1);
    }
    // The loop guard counts only attempts that mapped nothing (another thread's page, a gone
    // range, a tombstone, a wake): a page this thread mapped and finds missing again was
    // dropped in between (MADV_DONTNEED), which is a new fault, not a loop.
    if (o == O_RESOLVED || o == O_FALLBACK) {
        guard_page = page;
        guard_count = 0;
    } else if (repeat) {
        guard_count++;
    } else {
        guard_page = page;
        guard_count = 1;
    }
    errno = saved_errno;
    return;

not_ours:
    inc(&gst.chained, 1);
    {
        // Entered again from inside the action we chain to (it passes SIGBUS back to us:
        // installed over us, then we over it): the default action ends the cycle.
        // Frame addresses, not locals' (a sanitizer's fake stack would move those).
        uintptr_t sp = (uintptr_t)__builtin_frame_address(0);
        if (chain_sp && sp < chain_sp && chain_sp - sp < (1u << 20)) {
            deliver_default(info);
            errno = saved_errno;
            return;
        }
    }
deliver:
    errno = saved_errno;
    chain(sig, info, uc);
    errno = saved_errno;
}

// MARK: - Administration -----------------------------------------------------------------------

// A forked child has copies of the table, but its copies of the ranges are not registered any
// more (without EVENT_FORK) and its fds still name the parent's address space: an ioctl from
// the child would fill the parent's pages. The child starts with an empty table.
static void atfork_child(void) {
    for (unsigned i = 0; i < CUFFD_SIGBUS_MAX_RANGES; i++) {
        atomic_store(&slots[i].state, SLOT_FREE);
        atomic_store(&slots[i].busy, 0);
        atomic_store(&slots[i].start, 0);
        atomic_store(&slots[i].end, 0);
    }
    atomic_store(&timed_ranges, 0);
    pthread_mutex_init(&admin, NULL);
}

static void register_atfork(void) { pthread_atfork(NULL, NULL, atfork_child); }

static void wait_idle(struct slot *s) {
    struct timespec ts = {0, 20000};
    while (atomic_load_explicit(&s->busy, memory_order_seq_cst) != 0) nanosleep(&ts, NULL);
}

static void free_resources(struct slot *s) {
    if (s->scratch) munmap(s->scratch, s->scratch_len);
    s->scratch = NULL;
    s->zero = NULL;
    s->scratch_len = 0;
}

int cuffd_sigbus_add(const struct cuffd_sigbus_range *range) {
    pthread_once(&atfork_once, register_atfork);
    struct cuffd_sigbus_range r = *range;
    uint64_t base = cuffd_page_size();
    atomic_store(&base_ps, base);
    if (!r.page_size) r.page_size = base;
    uint64_t ps = r.page_size;
    if ((ps & (ps - 1)) || ps < base || !r.len || ((r.start | r.len) & (ps - 1)) || r.start + r.len < r.start)
        return -EINVAL;
    if (r.uffd < 0 || r.policy < CUFFD_SIGBUS_COPY || r.policy > CUFFD_SIGBUS_CUSTOM) return -EINVAL;
    if ((r.policy == CUFFD_SIGBUS_COPY || r.policy == CUFFD_SIGBUS_MOVE) && !r.src) return -EINVAL;
    if (r.policy == CUFFD_SIGBUS_FILE && r.file_fd < 0) return -EINVAL;
    if (r.policy == CUFFD_SIGBUS_CUSTOM && !r.decide) return -EINVAL;
    if (r.fallback < CUFFD_SIGBUS_FALLBACK_SIGNAL || r.fallback > CUFFD_SIGBUS_FALLBACK_POISON) return -EINVAL;
    if (r.flags & ~(uint32_t)CUFFD_SIGBUS_LATENCY) return -EINVAL;
    if (!r.scratch_pages) r.scratch_pages = 8;
    if (r.scratch_pages > 64) r.scratch_pages = 64;

    pthread_mutex_lock(&admin);
    uint32_t n = atomic_load(&nslots_used);
    struct slot *s = NULL;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t st = atomic_load(&slots[i].state);
        if (st == SLOT_ACTIVE && r.start < atomic_load(&slots[i].end) && atomic_load(&slots[i].start) < r.start + r.len) {
            pthread_mutex_unlock(&admin);
            return -EEXIST;
        }
    }
    // A free slot first; then the tombstone of a removed range at the same addresses (the new
    // range answers for them now); then a never-used slot (so other tombstones live as long as
    // possible); then any tombstone. The handler scans slots [0, nslots_used): reuse keeps it short.
    for (uint32_t i = 0; i < n && !s; i++) {
        uint32_t want = SLOT_FREE;
        if (atomic_compare_exchange_strong(&slots[i].state, &want, SLOT_SETUP)) s = &slots[i];
    }
    for (uint32_t i = 0; i < n && !s; i++) {
        uint32_t want = SLOT_RETIRED;
        if (r.start < atomic_load(&slots[i].end) && atomic_load(&slots[i].start) < r.start + r.len &&
            atomic_compare_exchange_strong(&slots[i].state, &want, SLOT_SETUP))
            s = &slots[i];
    }
    if (!s && n < CUFFD_SIGBUS_MAX_RANGES) s = &slots[n];
    for (uint32_t i = 0; i < n && !s; i++) {
        uint32_t want = SLOT_RETIRED;
        if (atomic_compare_exchange_strong(&slots[i].state, &want, SLOT_SETUP)) s = &slots[i];
    }
    if (!s) {
        pthread_mutex_unlock(&admin);
        return -ENOSPC;
    }
    atomic_store(&s->state, SLOT_SETUP);
    wait_idle(s); // a handler that read the tombstone's range before it was claimed
    free_resources(s);
    bool huge = ps != base;
    uint64_t npages = (r.policy == CUFFD_SIGBUS_FILE ? r.scratch_pages : 0) + (huge ? 1 : 0);
    if (npages) {
        s->scratch_len = npages * ps;
        void *m = mmap(NULL, s->scratch_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            int e = errno;
            s->scratch = NULL;
            atomic_store(&s->start, 0);
            atomic_store(&s->end, 0);
            atomic_store(&s->state, SLOT_FREE);
            pthread_mutex_unlock(&admin);
            return -e;
        }
        s->scratch = m;
        if (huge) s->zero = s->scratch + (npages - 1) * ps;
    }
    s->r = r;
    s->ps = ps;
    atomic_store(&s->scratch_free, r.policy == CUFFD_SIGBUS_FILE
                                       ? (r.scratch_pages == 64 ? ~0ull : (1ull << r.scratch_pages) - 1)
                                       : 0);
    memset((void *)&s->st, 0, sizeof s->st);
    atomic_store(&s->st.lat.min, UINT64_MAX);
    atomic_store(&s->npoisoned, 0);
    for (unsigned i = 0; i < CUFFD_SIGBUS_MAX_POISONED; i++) atomic_store(&s->poisoned[i], 0);
    atomic_store(&s->start, r.start);
    atomic_store(&s->end, r.start + r.len);
    if (r.flags & CUFFD_SIGBUS_LATENCY) atomic_fetch_add(&timed_ranges, 1);
    atomic_store_explicit(&s->state, SLOT_ACTIVE, memory_order_release);
    int id = (int)(s - slots);
    if ((uint32_t)id >= n) atomic_store_explicit(&nslots_used, (uint32_t)id + 1, memory_order_release);
    pthread_mutex_unlock(&admin);
    return id;
}

int cuffd_sigbus_remove(int id) {
    if (id < 0 || id >= CUFFD_SIGBUS_MAX_RANGES) return -ENOENT;
    struct slot *s = &slots[id];
    pthread_mutex_lock(&admin);
    uint32_t want = SLOT_ACTIVE;
    if (!atomic_compare_exchange_strong(&s->state, &want, SLOT_RETIRED)) {
        pthread_mutex_unlock(&admin);
        return -ENOENT;
    }
    if (s->r.flags & CUFFD_SIGBUS_LATENCY) atomic_fetch_sub(&timed_ranges, 1);
    wait_idle(s);
    pthread_mutex_unlock(&admin);
    return 0;
}

int cuffd_sigbus_range_stats(int id, struct cuffd_sigbus_stats *out) {
    if (id < 0 || id >= CUFFD_SIGBUS_MAX_RANGES) return -ENOENT;
    struct slot *s = &slots[id];
    uint32_t st = atomic_load(&s->state);
    if (st != SLOT_ACTIVE && st != SLOT_RETIRED) return -ENOENT;
    memset(out, 0, sizeof *out);
    out->signals = atomic_load(&s->st.signals);
    out->resolved = atomic_load(&s->st.resolved);
    out->existed = atomic_load(&s->st.existed);
    out->gone = atomic_load(&s->st.gone);
    out->retries = atomic_load(&s->st.retries);
    out->fallbacks = atomic_load(&s->st.fallbacks);
    out->delivered = atomic_load(&s->st.delivered);
    out->loop_breaks = atomic_load(&s->st.loop_breaks);
    out->bytes = atomic_load(&s->st.bytes);
    for (int i = 0; i < 8; i++) out->ops[i] = atomic_load(&s->st.ops[i]);
    out->first_error = atomic_load(&s->st.first_error);
    out->poisoned_hits = atomic_load(&s->st.poisoned_hits);
    // Not a snapshot while faults are in flight (a sample may be in its bucket and not yet in
    // the count, or the reverse): the percentile tolerates a count the buckets do not reach.
    struct cuffd_sigbus_latency *l = &out->latency;
    l->count = atomic_load(&s->st.lat.count);
    l->sum_ns = atomic_load(&s->st.lat.sum);
    l->max_ns = atomic_load(&s->st.lat.max);
    for (unsigned i = 0; i < CUFFD_SIGBUS_LAT_BUCKETS; i++) l->buckets[i] = atomic_load(&s->st.lat.buckets[i]);
    uint64_t mn = atomic_load(&s->st.lat.min);
    l->min_ns = l->count && mn != UINT64_MAX ? mn : 0;
    return 0;
}

void cuffd_sigbus_global(struct cuffd_sigbus_global_stats *out) {
    out->signals = atomic_load(&gst.signals);
    out->chained = atomic_load(&gst.chained);
    out->retired = atomic_load(&gst.retired);
}

int cuffd_sigbus_install(void) {
    pthread_once(&atfork_once, register_atfork);
    pthread_mutex_lock(&admin);
    int rc = 0;
    struct sigaction cur;
    sigaction(SIGBUS, NULL, &cur);
    bool ours = (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus;
    if (!ours) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_sigbus;
        sigemptyset(&sa.sa_mask);
        // SA_NODEFER: a SIGBUS while SIGBUS is blocked is fatal; another signal's handler that
        // touches a range inside ours must still be resolved. SA_ONSTACK: the thread's alternate
        // stack when it has one.
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER | SA_RESTART;
        struct sigaction old;
        // Publish what we chain to before the handler can run.
        if (sigaction(SIGBUS, NULL, &old) < 0) rc = -errno;
        if (rc == 0) {
            previous = old;
            atomic_store(&previous_reset, 0);
            if (sigaction(SIGBUS, &sa, NULL) < 0) rc = -errno;
        }
    }
    if (rc == 0) {
        atomic_store(&installed, 1);
        atomic_store_explicit(&active, 1, memory_order_release);
    }
    pthread_mutex_unlock(&admin);
    return rc;
}

int cuffd_sigbus_uninstall(bool restore) {
    pthread_mutex_lock(&admin);
    uint32_t n = atomic_load(&nslots_used);
    for (uint32_t i = 0; i < n; i++) {
        if (atomic_load(&slots[i].state) == SLOT_ACTIVE) {
            pthread_mutex_unlock(&admin);
            return -EBUSY;
        }
    }
    atomic_store_explicit(&active, 0, memory_order_release);
    int rc = 0;
    if (restore) {
        struct sigaction cur;
        sigaction(SIGBUS, NULL, &cur);
        bool ours = (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus;
        if (!ours) {
            rc = -EBUSY;
        } else {
            struct sigaction back = previous;
            if (atomic_load(&previous_reset)) {
                memset(&back, 0, sizeof back);
                back.sa_handler = SIG_DFL;
            }
            if (sigaction(SIGBUS, &back, NULL) < 0) rc = -errno;
            else atomic_store(&installed, 0);
        }
    }
    pthread_mutex_unlock(&admin);
    return rc;
}

bool cuffd_sigbus_installed(void) {
    if (!atomic_load(&active) || !atomic_load(&installed)) return false;
    struct sigaction cur;
    sigaction(SIGBUS, NULL, &cur);
    // Installed over by someone who chains to us still counts: their handler passes our
    // signals on (that is what chaining means); we cannot see that from here, so only the
    // direct case is reported.
    return (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus;
}

int cuffd_sigbus_prefault(int id, uint64_t addr, uint64_t len) {
    if (id < 0 || id >= CUFFD_SIGBUS_MAX_RANGES) return -ENOENT;
    struct slot *s = &slots[id];
    atomic_fetch_add(&s->busy, 1);
    if (atomic_load(&s->state) != SLOT_ACTIVE) {
        atomic_fetch_sub(&s->busy, 1);
        return -ENOENT;
    }
    int rc = 0;
    uint64_t start = s->r.start, end = start + s->r.len;
    if (addr < start || addr >= end || len > end - addr) rc = -EINVAL;
    for (uint64_t p = addr & ~(s->ps - 1); rc == 0 && p < addr + len; p += s->ps) {
        struct cuffd_resolution r;
        bool file;
        int64_t done = 0;
        int err = 0;
        rc = decide(s, p, p, &r, &file);
        if (rc < 0) break;
        int o = run_op(s, &r, file, &done, &err);
        if (o == O_RESOLVED) {
            inc(&s->st.resolved, 1);
            inc(&s->st.bytes, (uint64_t)done);
        } else if (o == O_EXISTED) {
            inc(&s->st.existed, 1);
        } else {
            rc = o == O_RETRY ? -EAGAIN : -err; // a custom policy that only wakes maps nothing
        }
    }
    atomic_fetch_sub(&s->busy, 1);
    return rc;
}
