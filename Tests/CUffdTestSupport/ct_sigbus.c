// In-thread resolution (cuffd_sigbus_*): the faulting thread resolves its own SIGBUS. Each test
// runs in a forked child (the runner resets SIGBUS to SIG_DFL there), so the process-wide
// handler and its table start empty. The rows (group "sigbus") map no fixture: each test opens
// its SIGBUS-mode uffd itself; InThreadTests.swift runs them one XCTest per row. A "previous" handler installed before ours records what
// reaches it and jumps back to the access that raised it, when the thread armed a jump.
#include "ct.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

// MARK: - the previous handler ---------------------------------------------------------------

static _Atomic int prev_calls;
static _Atomic int prev_code;
static _Atomic uintptr_t prev_addr;
static __thread sigjmp_buf prev_jmp;
static __thread volatile int prev_armed;

static void prev_handler(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    atomic_fetch_add(&prev_calls, 1);
    atomic_store(&prev_code, si->si_code);
    atomic_store(&prev_addr, (uintptr_t)si->si_addr);
    if (prev_armed) {
        prev_armed = 0;
        siglongjmp(prev_jmp, 1);
    }
    _exit(77); // unexpected: a SIGBUS nobody in the test was waiting for
}

static void install_prev(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = prev_handler;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, NULL);
}

// Reads one byte; 1 when the previous handler got a SIGBUS instead (the read did not finish).
static int read_or_prev(volatile const char *p, uint8_t *v) {
    if (sigsetjmp(prev_jmp, 1)) return 1;
    prev_armed = 1;
    *v = (uint8_t)*p;
    prev_armed = 0;
    return 0;
}

// The common setup: a fixture with UFFD_FEATURE_SIGBUS, registered `modes`, our handler
// installed over prev_handler (when with_prev).
static int setup(struct ct_fix *f, int kind, size_t npages, uint64_t modes, bool with_prev, char *msg,
                 size_t msglen) {
    uint64_t feats = UFFD_FEATURE_SIGBUS, avail = 0, io = 0;
    // POISON and MOVE where the kernel has them (the tests that need them check f->features).
    if (cuffd_probe(&avail, &io) == 0) feats |= avail & (UFFD_FEATURE_POISON | UFFD_FEATURE_MOVE);
    if (kind == CUFFD_MEM_SHMEM || kind == CUFFD_MEM_SHMEM_PRIVATE) feats |= UFFD_FEATURE_MISSING_SHMEM;
    if (kind == CUFFD_MEM_HUGETLB) feats |= UFFD_FEATURE_MISSING_HUGETLBFS;
    if (modes & UFFDIO_REGISTER_MODE_MINOR)
        feats |= kind == CUFFD_MEM_HUGETLB ? UFFD_FEATURE_MINOR_HUGETLBFS : UFFD_FEATURE_MINOR_SHMEM;
    int rc = ct_fix_init(f, kind, npages, feats, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    int e = cuffd_register(f->uffd, (uint64_t)(uintptr_t)f->base, f->ps * npages, modes, NULL);
    if (e < 0) {
        snprintf(msg, msglen, "cuffd_register: %s", ct_err(e));
        ct_fix_fini(f);
        return CUFFD_TEST_FAIL;
    }
    if (with_prev) install_prev();
    e = cuffd_sigbus_install();
    if (e < 0) {
        snprintf(msg, msglen, "cuffd_sigbus_install: %s", ct_err(e));
        ct_fix_fini(f);
        return CUFFD_TEST_FAIL;
    }
    return CUFFD_TEST_PASS;
}

static struct cuffd_sigbus_range range_of(const struct ct_fix *f, uint32_t policy, int32_t fallback) {
    struct cuffd_sigbus_range r;
    memset(&r, 0, sizeof r);
    r.start = (uint64_t)(uintptr_t)f->base;
    r.len = f->ps * f->npages;
    r.page_size = f->ps;
    r.uffd = f->uffd;
    r.policy = policy;
    r.fallback = fallback;
    r.file_fd = -1;
    r.src = (uint64_t)(uintptr_t)f->src;
    return r;
}

// Two shared pages over a file of one: reading the second raises a SIGBUS that is not ours
// (BUS_ADRERR outside every range). The file is unlinked; 0 with *fd and *map for the caller to
// release, or -errno (*fd / *map left for the caller to release as well).
static int map_past_eof(long ps, int *fd, char **map) {
    char path[] = "/tmp/ct_sigbus_eof_XXXXXX";
    *fd = mkstemp(path);
    if (*fd < 0) return -errno;
    unlink(path);
    if (ftruncate(*fd, ps) != 0) return -errno;
    *map = mmap(NULL, 2 * ps, PROT_READ, MAP_SHARED, *fd, 0);
    return *map == MAP_FAILED ? -errno : 0;
}

// In a forked child (whose copy of the parent's range is not registered: no EVENT_FORK): a
// SIGBUS-mode uffd of its own with one fresh anonymous page registered MISSING. The uffd, or -1.
static int child_own_page(size_t ps, char **page) {
    int u = cuffd_open(CUFFD_OPEN_NONBLOCK, NULL, NULL);
    uint64_t granted = 0, io = 0;
    if (u < 0 || cuffd_api(u, UFFD_FEATURE_SIGBUS, &granted, &io) < 0) return -1;
    *page = mmap(NULL, ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (*page == MAP_FAILED ||
        cuffd_register(u, (uint64_t)(uintptr_t)*page, ps, UFFDIO_REGISTER_MODE_MISSING, NULL) < 0)
        return -1;
    return u;
}

// MARK: - many threads, same and different pages ---------------------------------------------

struct mt_arg {
    pthread_t th;
    char *base;
    size_t ps, first, count, step;
    uint64_t sum;
    atomic_int *go;
};

static void *mt_main(void *p) {
    struct mt_arg *a = p;
    while (!atomic_load(a->go)) sched_yield();
    uint64_t sum = 0;
    for (size_t i = 0; i < a->count; i++) {
        size_t page = a->first + i * a->step;
        // Two bytes of the page: the first access resolves it, the second checks it stayed.
        sum += (uint8_t)((volatile char *)a->base)[page * a->ps + (i % 7) * 512];
        sum += (uint8_t)((volatile char *)a->base)[page * a->ps + a->ps - 1];
    }
    a->sum = sum;
    return NULL;
}

// 4 threads read every page in the same order (racing on each page: one COPY wins, the rest
// see EEXIST); 4 threads read their own slices of a second half.
static int sigbus_threads(int kind, char *msg, size_t msglen) {
    enum { N = 8, SAME = 4 };
    size_t npages = kind == CUFFD_MEM_HUGETLB ? 8 : 256;
    struct ct_fix f;
    int rc = setup(&f, kind, npages, UFFDIO_REGISTER_MODE_MISSING, false, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    struct mt_arg a[N];
    int started = 0;
    atomic_int go = 0;
    struct cuffd_sigbus_range r = range_of(&f, CUFFD_SIGBUS_COPY, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    int id = cuffd_sigbus_add(&r);
    CT_CHECK(id >= 0, "cuffd_sigbus_add: %s", ct_err(id));
    size_t half = npages / 2, slice = half / (N - SAME);
    for (int i = 0; i < N; i++) {
        a[i] = (struct mt_arg){.base = f.base, .ps = f.ps, .go = &go};
        if (i < SAME) {
            a[i].first = 0, a[i].count = half, a[i].step = 1;
        } else {
            a[i].first = half + (size_t)(i - SAME) * slice, a[i].count = slice, a[i].step = 1;
        }
        CT_CHECK(pthread_create(&a[i].th, NULL, mt_main, &a[i]) == 0, "pthread_create");
        started++;
    }
    atomic_store(&go, 1);
    for (int i = 0; i < N; i++) CT_CHECK(ct_join(a[i].th, CT_WAIT_MS * 2) == 0, "thread %d did not finish", i);
    started = 0;
    for (size_t p = 0; p < npages; p++) {
        long bad = ct_check_pattern(f.base + p * f.ps, f.ps, p);
        CT_CHECK(bad < 0, "page %zu offset %ld differs from the source", p, bad);
    }
    for (int i = 1; i < SAME; i++) CT_CHECK(a[i].sum == a[0].sum, "threads on the same pages read different sums");
    struct cuffd_sigbus_stats st;
    CT_CHECK(cuffd_sigbus_range_stats(id, &st) == 0, "stats");
    CT_CHECK(st.resolved == npages, "resolved %llu pages, want %zu (each page exactly once)",
             (unsigned long long)st.resolved, npages);
    CT_CHECK(st.ops[CUFFD_OP_COPY] == npages && st.bytes == npages * f.ps, "copies %llu bytes %llu",
             (unsigned long long)st.ops[CUFFD_OP_COPY], (unsigned long long)st.bytes);
    CT_CHECK(st.signals == st.resolved + st.existed + st.gone, "signals %llu != resolved %llu + existed %llu + gone %llu",
             (unsigned long long)st.signals, (unsigned long long)st.resolved, (unsigned long long)st.existed,
             (unsigned long long)st.gone);
    CT_CHECK(st.fallbacks == 0 && st.delivered == 0 && st.loop_breaks == 0 && st.first_error == 0,
             "unexpected failures: fallbacks %llu delivered %llu loops %llu first error %s",
             (unsigned long long)st.fallbacks, (unsigned long long)st.delivered,
             (unsigned long long)st.loop_breaks, ct_err(st.first_error));
    CT_CHECK(cuffd_sigbus_remove(id) == 0, "remove");
    CT_CHECK(cuffd_sigbus_range_stats(id, &st) == 0, "a removed range keeps its stats until reused");
    CT_CHECK(cuffd_sigbus_remove(id) == -ENOENT, "a second remove is ENOENT");
    rc = CUFFD_TEST_PASS;
out:
    atomic_store(&go, 1);
    for (int i = 0; i < started; i++) ct_join(a[i].th, CT_WAIT_MS);
    ct_fix_fini(&f);
    return rc;
}

// MARK: - not ours ------------------------------------------------------------------------------

// A SIGBUS that is not ours reaches the previous handler as if we were not there: a truncated
// file mapping (BUS_ADRERR outside every range) and a kill(SIGBUS) (SI_USER).
static int sigbus_not_ours(int kind, char *msg, size_t msglen) {
    (void)kind;
    struct ct_fix f;
    int fd = -1;
    char *map = MAP_FAILED;
    long ps = sysconf(_SC_PAGESIZE);
    int rc = setup(&f, CUFFD_MEM_ANON, 4, UFFDIO_REGISTER_MODE_MISSING, true, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    struct cuffd_sigbus_range r = range_of(&f, CUFFD_SIGBUS_COPY, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    int id = cuffd_sigbus_add(&r);
    CT_CHECK(id >= 0, "cuffd_sigbus_add: %s", ct_err(id));

    int e = map_past_eof(ps, &fd, &map);
    CT_CHECK(e == 0, "a file mapping past its end: %s", ct_err(e));
    uint8_t v = 0;
    CT_CHECK(read_or_prev(map, &v) == 0, "the page before the end raised SIGBUS");
    CT_CHECK(read_or_prev(map + ps + 5, &v) == 1, "reading past the truncated end did not raise SIGBUS");
    CT_CHECK(atomic_load(&prev_calls) == 1 && atomic_load(&prev_code) == BUS_ADRERR &&
                 atomic_load(&prev_addr) == (uintptr_t)(map + ps + 5),
             "previous handler: %d calls, code %d, addr %p (want 1, BUS_ADRERR, %p)", atomic_load(&prev_calls),
             atomic_load(&prev_code), (void *)atomic_load(&prev_addr), (void *)(map + ps + 5));

    // kill(SIGBUS): SI_USER, passed on unchanged.
    if (sigsetjmp(prev_jmp, 1) == 0) {
        prev_armed = 1;
        kill(getpid(), SIGBUS);
        prev_armed = 0;
    }
    CT_CHECK(atomic_load(&prev_calls) == 2 && atomic_load(&prev_code) == SI_USER,
             "kill(SIGBUS): previous handler %d calls, code %d", atomic_load(&prev_calls), atomic_load(&prev_code));

    // Our own pages still resolve in between.
    CT_CHECK(read_or_prev(f.base + 1, &v) == 0 && v == ct_pat(0, 1), "page 0 did not resolve");
    struct cuffd_sigbus_global_stats g;
    cuffd_sigbus_global(&g);
    CT_CHECK(g.chained >= 2, "chained %llu", (unsigned long long)g.chained);
    rc = CUFFD_TEST_PASS;
out:
    if (map != MAP_FAILED) munmap(map, 2 * ps);
    if (fd >= 0) close(fd);
    ct_fix_fini(&f);
    return rc;
}

// With the default action before us, a signal that is not ours, and one of ours whose
// resolution fails with fallback SIGNAL, kill the process with SIGBUS (in forked children).
static int sigbus_default_action(int kind, char *msg, size_t msglen) {
    (void)kind;
    struct ct_fix f;
    int rc = setup(&f, CUFFD_MEM_ANON, 4, UFFDIO_REGISTER_MODE_MISSING, false, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    // The source is a hole outside any mapping: COPY fails (EFAULT), fallback SIGNAL.
    struct cuffd_sigbus_range r = range_of(&f, CUFFD_SIGBUS_COPY, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    char *hole = mmap(NULL, f.ps * 4, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CT_CHECK(hole != MAP_FAILED, "mmap");
    r.src = (uint64_t)(uintptr_t)hole;
    r.len = 2 * f.ps; // pages 0-1 fail; pages 2-3 stay out of the table (not ours)
    int id = cuffd_sigbus_add(&r);
    CT_CHECK(id >= 0, "cuffd_sigbus_add: %s", ct_err(id));
    for (int which = 0; which < 2; which++) {
        fflush(NULL);
        pid_t pid = fork();
        CT_CHECK(pid >= 0, "fork");
        if (pid == 0) {
            // Child: the range is not registered here (no EVENT_FORK) — so use kill for the
            // "not ours" case and a fresh registration for the "ours, failed" case.
            if (which == 0) {
                kill(getpid(), SIGBUS);
                _exit(0);
            }
            char *m = NULL;
            int u = child_own_page(f.ps, &m);
            if (u < 0) _exit(10);
            struct cuffd_sigbus_range cr = r;
            cr.uffd = u;
            cr.start = (uint64_t)(uintptr_t)m;
            cr.len = f.ps;
            if (cuffd_sigbus_add(&cr) < 0 || cuffd_sigbus_install() < 0) _exit(12);
            (void)*(volatile char *)m;
            _exit(0);
        }
        int st = 0;
        CT_CHECK(waitpid(pid, &st, 0) == pid, "waitpid");
        CT_CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGBUS, "%s: child status 0x%x, want death by SIGBUS",
                 which ? "failed resolution" : "kill(SIGBUS)", st);
    }
    munmap(hole, f.ps * 4);
    rc = CUFFD_TEST_PASS;
out:
    ct_fix_fini(&f);
    return rc;
}

// A CUSTOM decision: COPY the faulting page from the fixture's source (laid out like the range).
static int copy_from_fixture(const struct ct_fix *f, uint64_t addr, struct cuffd_resolution *res) {
    uint64_t page = addr & ~(f->ps - 1);
    res->op = CUFFD_OP_COPY;
    res->dst = page;
    res->len = f->ps;
    res->src = (uint64_t)(uintptr_t)f->src + (page - (uint64_t)(uintptr_t)f->base);
    return 0;
}

// MARK: - alternate stack -----------------------------------------------------------------------

static _Atomic uintptr_t decide_sp;

static int decide_record_sp(void *ctx, uint64_t addr, struct cuffd_resolution *res) {
    const struct ct_fix *f = ctx;
    // The frame address: a local's address may be on a sanitizer's fake stack.
    atomic_store(&decide_sp, (uintptr_t)__builtin_frame_address(0));
    return copy_from_fixture(f, addr, res);
}

struct alt_arg {
    const struct ct_fix *f;
    char *stack;
    size_t size;
    int ok;
    uint8_t v;
};

static void *alt_main(void *p) {
    struct alt_arg *a = p;
    stack_t ss = {.ss_sp = a->stack, .ss_size = a->size, .ss_flags = 0};
    if (sigaltstack(&ss, NULL) != 0) return NULL;
    a->v = (uint8_t)((volatile char *)a->f->base)[3 * a->f->ps + 100];
    a->ok = 1;
    ss.ss_flags = SS_DISABLE;
    sigaltstack(&ss, NULL);
    return NULL;
}

// A thread with an alternate signal stack (16 KiB) resolves its fault on that stack.
static int sigbus_altstack(int kind, char *msg, size_t msglen) {
    (void)kind;
    struct ct_fix f;
    struct alt_arg a = {0};
    int rc = setup(&f, CUFFD_MEM_ANON, 4, UFFDIO_REGISTER_MODE_MISSING, false, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    struct cuffd_sigbus_range r = range_of(&f, CUFFD_SIGBUS_CUSTOM, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    r.decide = decide_record_sp;
    r.ctx = &f;
    int id = cuffd_sigbus_add(&r);
    CT_CHECK(id >= 0, "cuffd_sigbus_add: %s", ct_err(id));
    a.f = &f;
    a.size = 16384;
    a.stack = mmap(NULL, a.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CT_CHECK(a.stack != MAP_FAILED, "mmap stack");
    pthread_t th;
    CT_CHECK(pthread_create(&th, NULL, alt_main, &a) == 0, "pthread_create");
    CT_CHECK(ct_join(th, CT_WAIT_MS) == 0, "the thread did not finish");
    CT_CHECK(a.ok, "sigaltstack failed");
    CT_CHECK(a.v == ct_pat(3, 100), "read %u, want the source byte %u", a.v, ct_pat(3, 100));
    uintptr_t sp = atomic_load(&decide_sp);
    CT_CHECK(sp >= (uintptr_t)a.stack && sp < (uintptr_t)a.stack + a.size,
             "the policy ran at %p, outside the alternate stack [%p, +%zu)", (void *)sp, (void *)a.stack, a.size);
    munmap(a.stack, a.size);
    rc = CUFFD_TEST_PASS;
out:
    ct_fix_fini(&f);
    return rc;
}

// MARK: - nested fault inside the policy --------------------------------------------------------

// The policy's source memory is itself an unresolved page of a SIGBUS-mode range. The kernel
// reads it in kernel mode: no nested signal, COPY fails with EFAULT. Fallback ZEROPAGE: the
// thread reads zeros and goes on; fallback SIGNAL: the SIGBUS reaches the previous handler once.
static int sigbus_nested_source(int kind, char *msg, size_t msglen) {
    (void)kind;
    struct ct_fix f;
    int rc = setup(&f, CUFFD_MEM_ANON, 8, UFFDIO_REGISTER_MODE_MISSING, true, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    // Pages 0-1 are the source range (zeropage policy, never touched); pages 2-3 copy from it
    // with fallback ZEROPAGE, pages 4-5 with fallback SIGNAL.
    struct cuffd_sigbus_range s0 = range_of(&f, CUFFD_SIGBUS_ZEROPAGE, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    s0.len = 2 * f.ps;
    struct cuffd_sigbus_range a = range_of(&f, CUFFD_SIGBUS_COPY, CUFFD_SIGBUS_FALLBACK_ZEROPAGE);
    a.start += 2 * f.ps, a.len = 2 * f.ps, a.src = (uint64_t)(uintptr_t)f.base;
    struct cuffd_sigbus_range b = a;
    b.start += 2 * f.ps, b.fallback = CUFFD_SIGBUS_FALLBACK_SIGNAL;
    int i0 = cuffd_sigbus_add(&s0), ia = cuffd_sigbus_add(&a), ib = cuffd_sigbus_add(&b);
    CT_CHECK(i0 >= 0 && ia >= 0 && ib >= 0, "cuffd_sigbus_add: %d %d %d", i0, ia, ib);
    CT_CHECK(cuffd_sigbus_add(&a) == -EEXIST, "an overlapping range was accepted");
    uint8_t v = 0xff;
    CT_CHECK(read_or_prev(f.base + 2 * f.ps + 9, &v) == 0 && v == 0, "fallback ZEROPAGE: read %u, want 0", v);
    struct cuffd_sigbus_stats st;
    cuffd_sigbus_range_stats(ia, &st);
    CT_CHECK(st.fallbacks == 1 && st.first_error == EFAULT && st.ops[CUFFD_OP_ZEROPAGE] == 1,
             "fallbacks %llu first error %s zeropages %llu", (unsigned long long)st.fallbacks, ct_err(st.first_error),
             (unsigned long long)st.ops[CUFFD_OP_ZEROPAGE]);
    CT_CHECK(read_or_prev(f.base + 4 * f.ps + 9, &v) == 1, "fallback SIGNAL: the read completed");
    CT_CHECK(atomic_load(&prev_calls) == 1 && atomic_load(&prev_code) == BUS_ADRERR &&
                 atomic_load(&prev_addr) == (uintptr_t)(f.base + 4 * f.ps + 9),
             "previous handler: %d calls code %d", atomic_load(&prev_calls), atomic_load(&prev_code));
    cuffd_sigbus_range_stats(ib, &st);
    CT_CHECK(st.delivered == 1 && st.signals == 1, "delivered %llu signals %llu", (unsigned long long)st.delivered,
             (unsigned long long)st.signals);
    // The source range was never faulted by a thread: still unresolved, nothing recorded.
    cuffd_sigbus_range_stats(i0, &st);
    CT_CHECK(st.signals == 0 && ct_present(f.base) == 0, "the source range was touched");
    rc = CUFFD_TEST_PASS;
out:
    ct_fix_fini(&f);
    return rc;
}

// MARK: - loop guard ----------------------------------------------------------------------------

static int decide_wake_only(void *ctx, uint64_t addr, struct cuffd_resolution *res) {
    uint64_t ps = *(const uint64_t *)ctx;
    res->op = CUFFD_OP_WAKE;
    res->dst = addr & ~(ps - 1);
    res->len = ps;
    return 0;
}

// A policy whose answer never maps the page: after a few attempts the signal is delivered to the
// previous handler (never an endless SIGBUS loop).
static int sigbus_loop_guard(int kind, char *msg, size_t msglen) {
    (void)kind;
    struct ct_fix f;
    int rc = setup(&f, CUFFD_MEM_ANON, 2, UFFDIO_REGISTER_MODE_MISSING, true, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    struct cuffd_sigbus_range r = range_of(&f, CUFFD_SIGBUS_CUSTOM, CUFFD_SIGBUS_FALLBACK_ZEROPAGE);
    r.decide = decide_wake_only;
    r.ctx = &f.ps;
    int id = cuffd_sigbus_add(&r);
    CT_CHECK(id >= 0, "cuffd_sigbus_add: %s", ct_err(id));
    uint8_t v;
    CT_CHECK(read_or_prev(f.base + 7, &v) == 1, "the read completed");
    struct cuffd_sigbus_stats st;
    cuffd_sigbus_range_stats(id, &st);
    CT_CHECK(st.loop_breaks == 1 && st.signals >= 2 && st.signals <= 8 && atomic_load(&prev_calls) == 1,
             "loop breaks %llu signals %llu previous calls %d", (unsigned long long)st.loop_breaks,
             (unsigned long long)st.signals, atomic_load(&prev_calls));
    // A page this thread maps, drops (MADV_DONTNEED) and faults again, many times in a row, is
    // a new fault each time, never a loop.
    CT_CHECK(cuffd_sigbus_remove(id) == 0, "remove");
    struct cuffd_sigbus_range z = range_of(&f, CUFFD_SIGBUS_COPY, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    int iz = cuffd_sigbus_add(&z);
    CT_CHECK(iz >= 0, "add copy");
    for (int i = 0; i < 20; i++) {
        CT_CHECK(read_or_prev(f.base + f.ps + 3, &v) == 0 && v == ct_pat(1, 3), "round %d: the page did not resolve", i);
        madvise(f.base + f.ps, f.ps, MADV_DONTNEED);
    }
    cuffd_sigbus_range_stats(iz, &st);
    CT_CHECK(st.resolved == 20 && st.loop_breaks == 0, "resolved %llu loop breaks %llu", (unsigned long long)st.resolved,
             (unsigned long long)st.loop_breaks);
    rc = CUFFD_TEST_PASS;
out:
    ct_fix_fini(&f);
    return rc;
}

// MARK: - policies ------------------------------------------------------------------------------

// Every built-in policy on its memory: zeropage, file (pread, tail past EOF zero), move (donor
// page i to page i; the donor emptied), continue (MINOR shmem), poison (delivered as hardware
// poison).
static int sigbus_policies(int kind, char *msg, size_t msglen) {
    (void)kind;
    struct ct_fix f;
    int fd = -1;
    char *donor = MAP_FAILED;
    char path[] = "/tmp/ct_sigbus_file_XXXXXX";
    // anon: 2 zeropage, 2 file, 2 move, 2 poison
    int rc = setup(&f, CUFFD_MEM_ANON, 8, UFFDIO_REGISTER_MODE_MISSING, true, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    uint64_t base = (uint64_t)(uintptr_t)f.base, ps = f.ps;
    struct cuffd_sigbus_range z = range_of(&f, CUFFD_SIGBUS_ZEROPAGE, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    z.len = 2 * ps;
    int izero = cuffd_sigbus_add(&z);
    CT_CHECK(izero >= 0, "add zeropage");

    fd = mkstemp(path);
    CT_CHECK(fd >= 0, "mkstemp");
    unlink(path);
    // The file: page 1 of the source pattern, then half of page 2 (the rest must read zero).
    CT_CHECK(pwrite(fd, f.src + ps, ps + ps / 2, 0) == (ssize_t)(ps + ps / 2), "pwrite");
    struct cuffd_sigbus_range fi = range_of(&f, CUFFD_SIGBUS_FILE, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    fi.start = base + 2 * ps, fi.len = 2 * ps, fi.file_fd = fd, fi.scratch_pages = 2;
    int ifile = cuffd_sigbus_add(&fi);
    CT_CHECK(ifile >= 0, "add file: %s", ct_err(ifile));

    int imove = -1;
    if (f.features & UFFD_FEATURE_MOVE) {
        donor = mmap(NULL, 2 * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        CT_CHECK(donor != MAP_FAILED, "mmap donor");
        madvise(donor, 2 * ps, MADV_DONTFORK);
        memcpy(donor, f.src + 4 * ps, 2 * ps);
        struct cuffd_sigbus_range m = range_of(&f, CUFFD_SIGBUS_MOVE, CUFFD_SIGBUS_FALLBACK_SIGNAL);
        m.start = base + 4 * ps, m.len = 2 * ps, m.src = (uint64_t)(uintptr_t)donor;
        imove = cuffd_sigbus_add(&m);
        CT_CHECK(imove >= 0, "add move");
    }
    struct cuffd_sigbus_range po = range_of(&f, CUFFD_SIGBUS_POISON, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    po.start = base + 6 * ps, po.len = 2 * ps;
    int ipoison = cuffd_sigbus_add(&po);
    CT_CHECK(ipoison >= 0, "add poison");

    uint8_t v;
    CT_CHECK(read_or_prev(f.base + 5, &v) == 0 && ct_check_zero(f.base, 2 * ps) < 0, "zeropage pages are not zero");
    CT_CHECK(read_or_prev(f.base + 2 * ps, &v) == 0 && ct_check_pattern(f.base + 2 * ps, ps, 1) < 0,
             "file page 0 differs from the file");
    CT_CHECK(read_or_prev(f.base + 3 * ps + ps - 1, &v) == 0 && v == 0, "file page 1 past EOF is not zero");
    CT_CHECK(memcmp(f.base + 3 * ps, f.src + 2 * ps, ps / 2) == 0, "file page 1 before EOF differs");
    if (imove >= 0) {
        CT_CHECK(read_or_prev(f.base + 4 * ps + 1, &v) == 0 && read_or_prev(f.base + 5 * ps + 1, &v) == 0, "move faults");
        CT_CHECK(ct_check_pattern(f.base + 4 * ps, ps, 4) < 0 && ct_check_pattern(f.base + 5 * ps, ps, 5) < 0,
                 "moved pages differ from the donor's");
        CT_CHECK(ct_present(donor) == 0 && ct_present(donor + ps) == 0, "the donor still holds its pages");
        // Dropped and faulted again: the donor page is a hole now, zeros are mapped.
        madvise(f.base + 4 * ps, ps, MADV_DONTNEED);
        CT_CHECK(read_or_prev(f.base + 4 * ps + 1, &v) == 0 && ct_check_zero(f.base + 4 * ps, ps) < 0,
                 "a dropped moved page did not come back as zeros");
    }
    if (!(f.features & UFFD_FEATURE_POISON)) CT_SKIP("kernel lacks UFFD_FEATURE_POISON (the other policies passed)");
    // The poisoned page: the access is delivered (the kernel says BUS_ADRERR for a poison
    // marker too); a second access as well, never filled over.
    CT_CHECK(read_or_prev(f.base + 6 * ps + 3, &v) == 1 && atomic_load(&prev_addr) == (uintptr_t)(f.base + 6 * ps + 3),
             "poison: the access was not delivered to the previous handler");
    int calls = atomic_load(&prev_calls);
    CT_CHECK(read_or_prev(f.base + 6 * ps + 8, &v) == 1 && atomic_load(&prev_calls) == calls + 1,
             "poison: a second access was not delivered");
    struct cuffd_sigbus_stats st;
    cuffd_sigbus_range_stats(ifile, &st);
    CT_CHECK(st.resolved == 2 && st.ops[CUFFD_OP_COPY] == 2, "file: resolved %llu", (unsigned long long)st.resolved);
    cuffd_sigbus_range_stats(ipoison, &st);
    CT_CHECK(st.ops[CUFFD_OP_POISON] == 1 && st.poisoned_hits == 2, "poison ops %llu hits %llu",
             (unsigned long long)st.ops[CUFFD_OP_POISON], (unsigned long long)st.poisoned_hits);
    // Out of the table before the memory goes (a later mapping may reuse the addresses).
    cuffd_sigbus_remove(izero);
    cuffd_sigbus_remove(ifile);
    if (imove >= 0) cuffd_sigbus_remove(imove);
    cuffd_sigbus_remove(ipoison);
    ct_fix_fini(&f);

    // continue: MINOR shmem, the page cache filled through the alias.
    rc = setup(&f, CUFFD_MEM_SHMEM, 4, UFFDIO_REGISTER_MODE_MINOR, false, msg, msglen);
    if (rc != CUFFD_TEST_PASS) goto out2;
    for (size_t p = 0; p < 4; p++) ct_fill_pattern(f.alias + p * f.ps, f.ps, p + 10);
    struct cuffd_sigbus_range c = range_of(&f, CUFFD_SIGBUS_CONTINUE, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    int ic = cuffd_sigbus_add(&c);
    CT_CHECK(ic >= 0, "add continue: %s", ct_err(ic));
    for (size_t p = 0; p < 4; p++)
        CT_CHECK(ct_check_pattern(f.base + p * f.ps, f.ps, p + 10) < 0, "continue page %zu differs", p);
    cuffd_sigbus_range_stats(ic, &st);
    CT_CHECK(st.ops[CUFFD_OP_CONTINUE] == 4, "continues %llu", (unsigned long long)st.ops[CUFFD_OP_CONTINUE]);
    rc = CUFFD_TEST_PASS;
out:
    ct_fix_fini(&f);
out2:
    if (donor != MAP_FAILED) munmap(donor, 2 * 4096);
    if (fd >= 0) close(fd);
    return rc;
}

// MARK: - kernel-mode access ----------------------------------------------------------------------

// A syscall writing into an unresolved page of a SIGBUS-mode range fails with EFAULT (no signal
// in kernel mode); after cuffd_sigbus_prefault it succeeds.
static int sigbus_kernel_access(int kind, char *msg, size_t msglen) {
    (void)kind;
    struct ct_fix f;
    int p[2] = {-1, -1};
    int rc = setup(&f, CUFFD_MEM_ANON, 4, UFFDIO_REGISTER_MODE_MISSING, true, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    struct cuffd_sigbus_range r = range_of(&f, CUFFD_SIGBUS_COPY, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    int id = cuffd_sigbus_add(&r);
    CT_CHECK(id >= 0, "add");
    CT_CHECK(pipe(p) == 0, "pipe");
    CT_CHECK(write(p[1], "hello", 5) == 5, "write");
    ssize_t n = read(p[0], f.base + f.ps + 10, 5);
    CT_CHECK(n < 0 && errno == EFAULT, "read(2) into an unresolved page: %zd (%s), want EFAULT", n, ct_err(errno));
    CT_CHECK(atomic_load(&prev_calls) == 0, "a signal reached the previous handler");
    int e = cuffd_sigbus_prefault(id, (uint64_t)(uintptr_t)f.base + f.ps + 10, 5);
    CT_CHECK(e == 0, "prefault: %s", ct_err(e));
    n = read(p[0], f.base + f.ps + 10, 5);
    CT_CHECK(n == 5 && memcmp(f.base + f.ps + 10, "hello", 5) == 0, "read after prefault: %zd", n);
    CT_CHECK(ct_check_pattern(f.base + f.ps, 10, 1) < 0, "the prefaulted page does not hold the source");
    CT_CHECK(cuffd_sigbus_prefault(id, (uint64_t)(uintptr_t)f.base + f.ps, f.ps) == 0, "prefault again (EEXIST: done)");
    CT_CHECK(cuffd_sigbus_prefault(id, (uint64_t)(uintptr_t)f.base, 5 * f.ps) == -EINVAL, "prefault past the range");
    rc = CUFFD_TEST_PASS;
out:
    if (p[0] >= 0) close(p[0]), close(p[1]);
    ct_fix_fini(&f);
    return rc;
}

// MARK: - uninstall with faults in flight -----------------------------------------------------------

struct fl_arg {
    pthread_t th;
    char *base;
    size_t ps, npages, first;
    atomic_int *stop;
    uint64_t touched;
};

static void *fl_main(void *p) {
    struct fl_arg *a = p;
    for (size_t i = 0; i < a->npages && !atomic_load(a->stop); i++) {
        size_t page = (a->first + i) % a->npages;
        (void)((volatile char *)a->base)[page * a->ps + 1];
        a->touched++;
    }
    return NULL;
}

// Threads fault through a range while it is unregistered, removed and the handler uninstalled
// (pass-through): no thread dies or hangs; every page holds the source or zeros (faulted after
// the unregister, as plain anonymous memory); then the previous action is restored.
static int sigbus_uninstall_in_flight(int kind, char *msg, size_t msglen) {
    (void)kind;
    enum { T = 4 };
    struct ct_fix f;
    size_t npages = 4096;
    int rc = setup(&f, CUFFD_MEM_ANON, npages, UFFDIO_REGISTER_MODE_MISSING, true, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    struct fl_arg a[T];
    int started = 0;
    atomic_int stop = 0;
    struct cuffd_sigbus_range r = range_of(&f, CUFFD_SIGBUS_COPY, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    int id = cuffd_sigbus_add(&r);
    CT_CHECK(id >= 0, "add");
    for (int i = 0; i < T; i++) {
        a[i] = (struct fl_arg){.base = f.base, .ps = f.ps, .npages = npages, .first = (size_t)i * npages / T, .stop = &stop};
        CT_CHECK(pthread_create(&a[i].th, NULL, fl_main, &a[i]) == 0, "pthread_create");
        started++;
    }
    // Let some faults through, then pull the range out from under them.
    struct cuffd_sigbus_stats st;
    for (int i = 0; i < 2000; i++) {
        cuffd_sigbus_range_stats(id, &st);
        if (st.resolved >= 200) break;
        usleep(500);
    }
    CT_CHECK(cuffd_unregister(f.uffd, (uint64_t)(uintptr_t)f.base, f.ps * npages) == 0, "unregister");
    CT_CHECK(cuffd_sigbus_remove(id) == 0, "remove");
    CT_CHECK(cuffd_sigbus_uninstall(false) == 0, "uninstall (pass-through)");
    CT_CHECK(!cuffd_sigbus_installed(), "still reported as installed");
    for (int i = 0; i < T; i++) CT_CHECK(ct_join(a[i].th, CT_WAIT_MS * 2) == 0, "thread %d did not finish", i);
    started = 0;
    size_t src = 0, zero = 0;
    for (size_t p = 0; p < npages; p++) {
        if (ct_check_pattern(f.base + p * f.ps, f.ps, p) < 0) src++;
        else if (ct_check_zero(f.base + p * f.ps, f.ps) < 0) zero++;
        else CT_FAIL("page %zu is neither the source nor zeros", p);
    }
    cuffd_sigbus_range_stats(id, &st);
    CT_CHECK(src >= st.resolved && src > 0, "pages from the source %zu, resolved %llu", src,
             (unsigned long long)st.resolved);
    CT_CHECK(atomic_load(&prev_calls) == 0, "a SIGBUS reached the previous handler");
    CT_CHECK(st.delivered == 0 && st.loop_breaks == 0, "delivered %llu loop breaks %llu",
             (unsigned long long)st.delivered, (unsigned long long)st.loop_breaks);
    // Restore the previous action: with every thread done this is safe.
    CT_CHECK(cuffd_sigbus_uninstall(true) == 0, "uninstall(restore)");
    struct sigaction cur;
    sigaction(SIGBUS, NULL, &cur);
    CT_CHECK(cur.sa_sigaction == prev_handler, "the previous handler is not back");
    // Install again and uninstall while a range is in the table: EBUSY.
    CT_CHECK(cuffd_sigbus_install() == 0, "install again");
    struct cuffd_sigbus_range r2 = range_of(&f, CUFFD_SIGBUS_ZEROPAGE, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    int id2 = cuffd_sigbus_add(&r2);
    CT_CHECK(id2 >= 0, "add again");
    CT_CHECK(cuffd_sigbus_uninstall(true) == -EBUSY, "uninstall with a range in the table was not EBUSY");
    CT_CHECK(cuffd_sigbus_remove(id2) == 0 && cuffd_sigbus_uninstall(true) == 0, "remove + uninstall");
    (void)src;
    (void)zero;
    rc = CUFFD_TEST_PASS;
out:
    atomic_store(&stop, 1);
    for (int i = 0; i < started; i++) ct_join(a[i].th, CT_WAIT_MS);
    ct_fix_fini(&f);
    return rc;
}

// MARK: - fork -------------------------------------------------------------------------------------

// After fork the child's copy of the range is not registered (no EVENT_FORK): it sees the pages
// resolved before the fork and zeros elsewhere, its table is empty (its fds would fill the
// parent's pages), and a SIGBUS there takes the default action. The parent goes on resolving.
static int sigbus_fork(int kind, char *msg, size_t msglen) {
    (void)kind;
    struct ct_fix f;
    size_t npages = 8;
    int rc = setup(&f, CUFFD_MEM_ANON, npages, UFFDIO_REGISTER_MODE_MISSING, false, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    struct cuffd_sigbus_range r = range_of(&f, CUFFD_SIGBUS_COPY, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    int id = cuffd_sigbus_add(&r);
    CT_CHECK(id >= 0, "add");
    for (size_t p = 0; p < npages / 2; p++) (void)((volatile char *)f.base)[p * f.ps];
    fflush(NULL);
    pid_t pid = fork();
    CT_CHECK(pid >= 0, "fork");
    if (pid == 0) {
        struct cuffd_sigbus_stats cst;
        if (cuffd_sigbus_range_stats(id, &cst) != -ENOENT) _exit(20);
        for (size_t p = 0; p < npages / 2; p++)
            if (ct_check_pattern(f.base + p * f.ps, f.ps, p) >= 0) _exit(21);
        for (size_t p = npages / 2; p < npages; p++)
            if (ct_check_zero(f.base + p * f.ps, f.ps) >= 0) _exit(22);
        // The child can serve its own ranges with its own uffd.
        char *m = NULL;
        int u = child_own_page(f.ps, &m);
        if (u < 0) _exit(23);
        struct cuffd_sigbus_range cr = r;
        cr.uffd = u, cr.start = (uint64_t)(uintptr_t)m, cr.len = f.ps;
        if (cuffd_sigbus_add(&cr) < 0) _exit(24);
        if (ct_check_pattern(m, f.ps, 0) >= 0) _exit(25);
        _exit(0);
    }
    int status = 0;
    CT_CHECK(waitpid(pid, &status, 0) == pid, "waitpid");
    CT_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child status 0x%x (exit code 20+: the check that failed)",
             status);
    for (size_t p = 0; p < npages; p++)
        CT_CHECK(ct_check_pattern(f.base + p * f.ps, f.ps, p) < 0, "parent page %zu differs after the fork", p);
    struct cuffd_sigbus_stats st;
    cuffd_sigbus_range_stats(id, &st);
    CT_CHECK(st.resolved == npages, "parent resolved %llu", (unsigned long long)st.resolved);
    rc = CUFFD_TEST_PASS;
out:
    ct_fix_fini(&f);
    return rc;
}

// MARK: - a handler installed over ours ------------------------------------------------------------

static struct sigaction above_prev;
static _Atomic int above_calls;

// Installed after ours: counts and passes every SIGBUS on to what it replaced (ours).
static void above_handler(int sig, siginfo_t *si, void *uc) {
    atomic_fetch_add(&above_calls, 1);
    above_prev.sa_sigaction(sig, si, uc);
}

// A handler installed over ours that chains to it keeps our ranges resolving, and a signal that
// is not ours still reaches the action before ours; installing ours again on top (it now
// chains to that handler, which chains back to us) ends in the previous action, not a cycle.
static int sigbus_chained_from_above(int kind, char *msg, size_t msglen) {
    (void)kind;
    struct ct_fix f;
    int fd = -1;
    char *map = MAP_FAILED;
    long ps = sysconf(_SC_PAGESIZE);
    int rc = setup(&f, CUFFD_MEM_ANON, 4, UFFDIO_REGISTER_MODE_MISSING, true, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    struct cuffd_sigbus_range r = range_of(&f, CUFFD_SIGBUS_COPY, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    int id = cuffd_sigbus_add(&r);
    CT_CHECK(id >= 0, "add");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = above_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    CT_CHECK(sigaction(SIGBUS, &sa, &above_prev) == 0 && (above_prev.sa_flags & SA_SIGINFO), "install above");
    uint8_t v = 0;
    CT_CHECK(read_or_prev(f.base + 5, &v) == 0 && v == ct_pat(0, 5), "our page did not resolve through the handler above");
    CT_CHECK(atomic_load(&above_calls) == 1, "above: %d calls", atomic_load(&above_calls));
    int e = map_past_eof(ps, &fd, &map);
    CT_CHECK(e == 0, "a file mapping past its end: %s", ct_err(e));
    CT_CHECK(read_or_prev(map + ps, &v) == 1 && atomic_load(&prev_calls) == 1, "foreign SIGBUS: previous calls %d",
             atomic_load(&prev_calls));
    // Ours on top again: ours -> above -> ours (deeper: the cycle is cut) -> default action. In a child.
    fflush(NULL);
    pid_t pid = fork();
    CT_CHECK(pid >= 0, "fork");
    if (pid == 0) {
        if (cuffd_sigbus_install() != 0) _exit(10);
        (void)*(volatile char *)(map + ps);
        _exit(0);
    }
    int st = 0;
    CT_CHECK(waitpid(pid, &st, 0) == pid, "waitpid");
    CT_CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGBUS, "the cycle did not end in the default action: status 0x%x", st);
    rc = CUFFD_TEST_PASS;
out:
    if (map != MAP_FAILED) munmap(map, 2 * ps);
    if (fd >= 0) close(fd);
    ct_fix_fini(&f);
    return rc;
}

// MARK: - gone ---------------------------------------------------------------------------------------

struct gone_ctx {
    const struct ct_fix *f;
};

// Unregisters the faulting page's range before answering COPY: the kernel then says ENOENT (no
// registered VMA), as for a range unregistered between the fault and its handler.
static int decide_unregister_first(void *ctx, uint64_t addr, struct cuffd_resolution *res) {
    const struct ct_fix *f = ((struct gone_ctx *)ctx)->f;
    cuffd_unregister(f->uffd, (uint64_t)(uintptr_t)f->base, f->ps * f->npages);
    return copy_from_fixture(f, addr, res);
}

// ENOENT (the range was unregistered under the fault) is "gone": no fallback, no delivery; the
// access is retried and, the memory being ordinary now, reads zeros.
static int sigbus_gone(int kind, char *msg, size_t msglen) {
    (void)kind;
    struct ct_fix f;
    int rc = setup(&f, CUFFD_MEM_ANON, 2, UFFDIO_REGISTER_MODE_MISSING, true, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    struct gone_ctx g = {.f = &f};
    struct cuffd_sigbus_range r = range_of(&f, CUFFD_SIGBUS_CUSTOM, CUFFD_SIGBUS_FALLBACK_ZEROPAGE);
    r.decide = decide_unregister_first;
    r.ctx = &g;
    int id = cuffd_sigbus_add(&r);
    CT_CHECK(id >= 0, "add");
    uint8_t v = 0xff;
    CT_CHECK(read_or_prev(f.base + f.ps + 2, &v) == 0 && v == 0, "read %u after the range went away, want 0", v);
    struct cuffd_sigbus_stats st;
    cuffd_sigbus_range_stats(id, &st);
    CT_CHECK(st.signals == 1 && st.gone == 1 && st.fallbacks == 0 && st.delivered == 0 && st.resolved == 0,
             "signals %llu gone %llu fallbacks %llu delivered %llu resolved %llu", (unsigned long long)st.signals,
             (unsigned long long)st.gone, (unsigned long long)st.fallbacks, (unsigned long long)st.delivered,
             (unsigned long long)st.resolved);
    CT_CHECK(atomic_load(&prev_calls) == 0, "a signal reached the previous handler");
    rc = CUFFD_TEST_PASS;
out:
    ct_fix_fini(&f);
    return rc;
}

// MARK: - latency ----------------------------------------------------------------------------------

#define SLOW_NS 2000000ull // the slow source: 2 ms per page

// A slow source: sleeps 2 ms (nanosleep is async-signal-safe), then COPY from the fixture's source.
static int decide_slow_copy(void *ctx, uint64_t addr, struct cuffd_resolution *res) {
    const struct ct_fix *f = ctx;
    struct timespec ts = {0, (long)SLOW_NS};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
    return copy_from_fixture(f, addr, res);
}

// The percentiles of one range's histogram are positive, in order, within [min, max], and the
// samples add up; "what" names the range in messages. CUFFD_TEST_PASS or FAIL.
static int check_latency(const struct cuffd_sigbus_latency *l, uint64_t want_count, const char *what, char *msg,
                         size_t msglen) {
    int rc = CUFFD_TEST_FAIL;
    uint64_t total = 0;
    for (unsigned i = 0; i < CUFFD_SIGBUS_LAT_BUCKETS; i++) total += l->buckets[i];
    CT_CHECK(l->count == want_count && total == want_count, "%s: latency count %llu, buckets %llu, want %llu", what,
             (unsigned long long)l->count, (unsigned long long)total, (unsigned long long)want_count);
    uint64_t p50 = cuffd_sigbus_latency_percentile(l, 50), p90 = cuffd_sigbus_latency_percentile(l, 90),
             p99 = cuffd_sigbus_latency_percentile(l, 99), p100 = cuffd_sigbus_latency_percentile(l, 100);
    CT_CHECK(l->min_ns > 0 && l->min_ns <= p50 && p50 <= p90 && p90 <= p99 && p99 <= l->max_ns && p100 == l->max_ns,
             "%s: want 0 < min %llu <= p50 %llu <= p90 %llu <= p99 %llu <= max %llu == p100 %llu", what,
             (unsigned long long)l->min_ns, (unsigned long long)p50, (unsigned long long)p90,
             (unsigned long long)p99, (unsigned long long)l->max_ns, (unsigned long long)p100);
    CT_CHECK(l->sum_ns >= l->count * l->min_ns && l->sum_ns <= l->count * l->max_ns,
             "%s: sum %llu outside count * [min, max]", what, (unsigned long long)l->sum_ns);
    rc = CUFFD_TEST_PASS;
out:
    return rc;
}

// The fault-service latency histogram: the bucket arithmetic (every value within its bucket,
// 12.5% precision); N faults -> N samples with ordered percentiles; a 2 ms source -> p50 >= 2 ms;
// a range added without CUFFD_SIGBUS_LATENCY records nothing; an unknown flag is EINVAL.
// The bucket arithmetic and percentiles of a synthetic histogram, outside any fault.
static int latency_buckets(char *msg, size_t msglen) {
    int rc = CUFFD_TEST_FAIL;
    unsigned prev = 0;
    for (uint64_t v = 0; v < 70000; v += 1 + v / 64) {
        unsigned b = cuffd_sigbus_latency_bucket_of(v);
        uint64_t up = cuffd_sigbus_latency_bucket_upper(b);
        CT_CHECK(b < CUFFD_SIGBUS_LAT_BUCKETS && b >= prev, "bucket of %llu: %u (previous %u)", (unsigned long long)v, b, prev);
        CT_CHECK(up >= v && (up - v) * 8 <= v, "%llu in bucket %u with upper bound %llu: outside 12.5%%",
                 (unsigned long long)v, b, (unsigned long long)up);
        CT_CHECK(b == 0 || cuffd_sigbus_latency_bucket_upper(b - 1) < v, "%llu also fits bucket %u", (unsigned long long)v, b - 1);
        prev = b;
    }
    for (unsigned e = 3; e < 64; e++) {
        uint64_t v = (uint64_t)1 << e;
        unsigned b = cuffd_sigbus_latency_bucket_of(v);
        CT_CHECK(cuffd_sigbus_latency_bucket_upper(b) >= v, "2^%u above its bucket's bound", e);
    }
    CT_CHECK(cuffd_sigbus_latency_bucket_of(UINT64_MAX) == CUFFD_SIGBUS_LAT_BUCKETS - 1, "the last bucket holds the rest");
    {
        struct cuffd_sigbus_latency syn;
        memset(&syn, 0, sizeof syn);
        CT_CHECK(cuffd_sigbus_latency_percentile(&syn, 50) == 0, "no samples: percentile 0");
        // 90 samples of 1000 ns, 10 of 100000 ns: p50 is 1000's bucket, p99 100000's, p100 max.
        syn.buckets[cuffd_sigbus_latency_bucket_of(1000)] = 90;
        syn.buckets[cuffd_sigbus_latency_bucket_of(100000)] = 10;
        syn.count = 100, syn.min_ns = 1000, syn.max_ns = 100000, syn.sum_ns = 90 * 1000 + 10 * 100000;
        uint64_t p50 = cuffd_sigbus_latency_percentile(&syn, 50), p90 = cuffd_sigbus_latency_percentile(&syn, 90),
                 p91 = cuffd_sigbus_latency_percentile(&syn, 91), p99 = cuffd_sigbus_latency_percentile(&syn, 99);
        CT_CHECK(p50 >= 1000 && p50 < 1125 && p90 == p50 && p91 == 100000 && p99 == 100000,
                 "synthetic: p50 %llu p90 %llu p91 %llu p99 %llu", (unsigned long long)p50, (unsigned long long)p90,
                 (unsigned long long)p91, (unsigned long long)p99);
    }
    rc = CUFFD_TEST_PASS;
out:
    return rc;
}

static int sigbus_latency(int kind, char *msg, size_t msglen) {
    (void)kind;
    enum { FAST = 64, SLOW = 8 };
    int rc = latency_buckets(msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    struct ct_fix f;
    rc = setup(&f, CUFFD_MEM_ANON, FAST + SLOW + 4, UFFDIO_REGISTER_MODE_MISSING, true, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    int fast = -1, slow = -1, off = -1;
    struct cuffd_sigbus_range r = range_of(&f, CUFFD_SIGBUS_COPY, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    r.len = FAST * f.ps;
    r.flags = 1u << 7;
    CT_CHECK(cuffd_sigbus_add(&r) == -EINVAL, "an unknown flag is not EINVAL");
    r.flags = CUFFD_SIGBUS_LATENCY;
    fast = cuffd_sigbus_add(&r);
    CT_CHECK(fast >= 0, "add fast: %s", ct_err(fast));
    r = range_of(&f, CUFFD_SIGBUS_CUSTOM, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    r.start += FAST * f.ps;
    r.len = SLOW * f.ps;
    r.decide = decide_slow_copy;
    r.ctx = &f;
    r.flags = CUFFD_SIGBUS_LATENCY;
    slow = cuffd_sigbus_add(&r);
    CT_CHECK(slow >= 0, "add slow: %s", ct_err(slow));
    r = range_of(&f, CUFFD_SIGBUS_COPY, CUFFD_SIGBUS_FALLBACK_SIGNAL);
    r.start += (FAST + SLOW) * f.ps;
    r.src += (FAST + SLOW) * f.ps; // COPY's source is laid out like the range
    r.len = 4 * f.ps;
    r.flags = 0;
    off = cuffd_sigbus_add(&r);
    CT_CHECK(off >= 0, "add untimed: %s", ct_err(off));

    uint8_t v = 0;
    for (size_t p = 0; p < f.npages; p++)
        CT_CHECK(read_or_prev(f.base + p * f.ps + 1, &v) == 0, "page %zu: the signal reached the previous handler", p);
    for (size_t p = 0; p < f.npages; p++) {
        long bad = ct_check_pattern(f.base + p * f.ps, f.ps, p);
        CT_CHECK(bad < 0, "page %zu offset %ld differs from the source", p, bad);
    }

    struct cuffd_sigbus_stats st;
    CT_CHECK(cuffd_sigbus_range_stats(fast, &st) == 0, "stats fast");
    CT_CHECK(st.resolved == FAST && st.signals == FAST, "fast: resolved %llu signals %llu, want %d",
             (unsigned long long)st.resolved, (unsigned long long)st.signals, FAST);
    rc = check_latency(&st.latency, st.resolved, "fast", msg, msglen);
    if (rc != CUFFD_TEST_PASS) goto out;
    rc = CUFFD_TEST_FAIL;

    CT_CHECK(cuffd_sigbus_range_stats(slow, &st) == 0, "stats slow");
    CT_CHECK(st.resolved == SLOW, "slow: resolved %llu, want %d", (unsigned long long)st.resolved, SLOW);
    rc = check_latency(&st.latency, st.resolved, "slow", msg, msglen);
    if (rc != CUFFD_TEST_PASS) goto out;
    rc = CUFFD_TEST_FAIL;
    uint64_t p50 = cuffd_sigbus_latency_percentile(&st.latency, 50);
    CT_CHECK(st.latency.min_ns >= SLOW_NS && p50 >= SLOW_NS, "slow: min %llu ns, p50 %llu ns, want >= %llu",
             (unsigned long long)st.latency.min_ns, (unsigned long long)p50, SLOW_NS);

    CT_CHECK(cuffd_sigbus_range_stats(off, &st) == 0, "stats untimed");
    CT_CHECK(st.resolved == 4 && st.latency.count == 0 && st.latency.max_ns == 0 && st.latency.min_ns == 0,
             "untimed: resolved %llu, latency count %llu max %llu min %llu", (unsigned long long)st.resolved,
             (unsigned long long)st.latency.count, (unsigned long long)st.latency.max_ns,
             (unsigned long long)st.latency.min_ns);
    CT_CHECK(atomic_load(&prev_calls) == 0, "a signal reached the previous handler");
    rc = CUFFD_TEST_PASS;
out:
    if (fast >= 0) cuffd_sigbus_remove(fast);
    if (slow >= 0) cuffd_sigbus_remove(slow);
    if (off >= 0) cuffd_sigbus_remove(off);
    ct_fix_fini(&f);
    return rc;
}

// MARK: - the table

// The rows map no fixture (npages 0): each test sets up its own SIGBUS-mode uffd and handler.
#define CT_SIGBUS_WRAP(n) \
    static int t_sigbus_##n(struct ct_fix *fx, char *msg, size_t msglen) { return sigbus_##n(fx->kind, msg, msglen); }
CT_SIGBUS_WRAP(threads)
CT_SIGBUS_WRAP(not_ours)
CT_SIGBUS_WRAP(default_action)
CT_SIGBUS_WRAP(altstack)
CT_SIGBUS_WRAP(nested_source)
CT_SIGBUS_WRAP(loop_guard)
CT_SIGBUS_WRAP(policies)
CT_SIGBUS_WRAP(kernel_access)
CT_SIGBUS_WRAP(uninstall_in_flight)
CT_SIGBUS_WRAP(fork)
CT_SIGBUS_WRAP(chained_from_above)
CT_SIGBUS_WRAP(gone)
CT_SIGBUS_WRAP(latency)

CT_CASES(sigbus) = {
    {"sigbus_threads", t_sigbus_threads, CT_M_ANON | CT_M_SHMEM | CT_M_HUGETLB, 0, 0,
     "Threads racing on the same pages and faulting their own resolve each page exactly once in-thread (EEXIST for the losers)."},
    {"sigbus_not_ours", t_sigbus_not_ours, 0, 0, 0,
     "A truncated file mapping's SIGBUS and a kill(SIGBUS) reach the handler installed before ours."},
    {"sigbus_default_action", t_sigbus_default_action, 0, 0, 0,
     "With the default action before ours, a foreign SIGBUS and a failed resolution kill with SIGBUS."},
    {"sigbus_altstack", t_sigbus_altstack, 0, 0, 0,
     "A thread with an alternate signal stack resolves its fault on that stack."},
    {"sigbus_nested_source", t_sigbus_nested_source, 0, 0, 0,
     "A policy source that is itself an unresolved SIGBUS-mode page fails with EFAULT and takes the fallback, no nested signal."},
    {"sigbus_loop_guard", t_sigbus_loop_guard, 0, 0, 0,
     "A resolution that maps nothing is delivered after a few attempts; a page dropped and faulted again is no loop."},
    {"sigbus_policies", t_sigbus_policies, 0, 0, 0,
     "Zeropage, file, move, continue and poison policies resolve (or deliver) as documented."},
    {"sigbus_kernel_access", t_sigbus_kernel_access, 0, 0, 0,
     "A syscall into an unresolved page gets EFAULT; after cuffd_sigbus_prefault it succeeds."},
    {"sigbus_uninstall_in_flight", t_sigbus_uninstall_in_flight, 0, 0, 0,
     "Unregister, remove and uninstall while threads fault: nobody dies or hangs; restore puts the old action back."},
    {"sigbus_fork", t_sigbus_fork, 0, 0, 0,
     "A forked child sees resolved pages and zeros, starts with an empty table and serves its own ranges."},
    {"sigbus_chained_from_above", t_sigbus_chained_from_above, 0, 0, 0,
     "A handler installed over ours that chains to it keeps our ranges working; ours on top again cannot cycle."},
    {"sigbus_gone", t_sigbus_gone, 0, 0, 0,
     "A range unregistered under the fault (ENOENT) is gone: the access is retried, no fallback, no signal."},
    {"sigbus_latency", t_sigbus_latency, 0, 0, 0,
     "Fault-service latency: N faults give N samples with ordered percentiles, a 2 ms source a p50 >= 2 ms, a range without CUFFD_SIGBUS_LATENCY none."},
    CT_END,
};
