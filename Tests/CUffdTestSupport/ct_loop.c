// The fault loop (cuffd_loop_run): several faulting threads and batches, stats, the fallback on
// OP_FAIL, draining on stop, and the EAGAIN retry when an event races.
#include "ct.h"

#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#define U(p) ((uint64_t)(uintptr_t)(p))

// The decider: COPY the pattern page for each fault; OP_FAIL for page `fail_page`.
struct lctx {
    uint64_t ps;
    char *base;
    size_t npages;
    const char *src;
    long fail_page;
    bool wake_only; // answer every fault with OP_WAKE: the thread re-faults at once
    uint32_t op;    // the op for served pages: 0 means COPY
    uint64_t mode;  // mode bits the decider asks for
    int misdirect;  // this many first decisions name page `misdirect_page` instead of the fault's
    long misdirect_page;
    // Written on the loop's thread only; read after it is joined.
    size_t max_batch;
    int outcomes[8];
    int fail_error;
    int fail_outcome;
    int kept;       // faults seen kept for the next round (outcome RETRY)
    int kept_error; // the error of the latest kept one
};

static void decide(void *c, const struct uffd_msg *msgs, struct cuffd_resolution *res, size_t n) {
    struct lctx *x = c;
    if (n > x->max_batch) x->max_batch = n;
    for (size_t i = 0; i < n; i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
        uint64_t a = msgs[i].arg.pagefault.address & ~(x->ps - 1);
        size_t idx = (size_t)((a - U(x->base)) / x->ps);
        if (x->wake_only) {
            res[i].op = CUFFD_OP_WAKE;
            res[i].dst = a;
            res[i].len = x->ps;
            continue;
        }
        if ((long)idx == x->fail_page) {
            res[i].op = CUFFD_OP_FAIL; // the loop's fallback picks the range
            continue;
        }
        if (x->misdirect > 0) {
            // A policy bug: the resolution misses the faulting page.
            x->misdirect--;
            idx = (size_t)x->misdirect_page;
            a = U(x->base) + idx * x->ps;
        }
        res[i].op = x->op ? x->op : CUFFD_OP_COPY;
        res[i].mode = x->mode;
        res[i].dst = a;
        res[i].len = x->ps;
        if (res[i].op == CUFFD_OP_COPY) res[i].src = U(x->src + idx * x->ps);
    }
}

static void complete(void *c, const struct uffd_msg *msgs, const struct cuffd_resolution *res, size_t n) {
    struct lctx *x = c;
    for (size_t i = 0; i < n; i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT || res[i].op == CUFFD_OP_NONE) continue;
        if (res[i].outcome < 8) x->outcomes[res[i].outcome]++;
        if (res[i].outcome == CUFFD_OUTCOME_RETRY) {
            x->kept++;
            x->kept_error = res[i].error;
            continue;
        }
        if (res[i].op == CUFFD_OP_FAIL) {
            x->fail_error = res[i].error;
            x->fail_outcome = (int)res[i].outcome;
        }
    }
}

struct lthread {
    pthread_t th;
    struct cuffd_loop_config cfg;
    struct cuffd_loop_stats st;
    int ret;
    bool running;
};

static void *lthread_main(void *a) {
    struct lthread *l = a;
    l->ret = cuffd_loop_run(&l->cfg, &l->st);
    return NULL;
}

static uint32_t next_spin_polls; // for the next lthread_start only

static int lthread_start(struct lthread *l, struct ct_fix *f, struct lctx *x, int stop_fd,
                         uint32_t batch, int fallback) {
    memset(l, 0, sizeof *l);
    l->cfg = (struct cuffd_loop_config){
        .uffd = f->uffd, .stop_fd = stop_fd, .batch = batch, .fallback = fallback,
        .features = f->features, .spin_polls = next_spin_polls, .decide = decide,
        .complete = complete, .ctx = x,
    };
    next_spin_polls = 0;
    int e = pthread_create(&l->th, NULL, lthread_main, l);
    if (e) return -e;
    l->running = true;
    return 0;
}

static int lthread_stop(struct lthread *l, int stop_fd) {
    if (!l->running) return 0;
    uint64_t one = 1;
    if (write(stop_fd, &one, sizeof one) != sizeof one) return -errno;
    if (ct_join(l->th, CT_WAIT_MS) != 0) return -ETIMEDOUT;
    l->running = false;
    return 0;
}

static void lctx_init(struct lctx *x, struct ct_fix *f, long fail_page) {
    memset(x, 0, sizeof *x);
    x->ps = f->ps;
    x->base = f->base;
    x->npages = f->npages;
    x->src = f->src;
    x->fail_page = fail_page;
}

#define NT 4

static int t_loop_threads(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct lctx x;
    struct lthread l = {0};
    int stop = -1;
    const size_t n = f->npages, per = n / NT;
    struct ct_toucher t[NT];
    pid_t tids[NT];
    int e = cuffd_register(f->uffd, U(f->base), n * f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    lctx_init(&x, f, -1);
    // The first fault of every thread is queued before the loop runs: its first read is a batch.
    for (int i = 0; i < NT; i++) {
        t[i] = (struct ct_toucher){.addr = f->base + i * per * f->ps, .count = per, .stride = f->ps};
        e = ct_touch_start(&t[i]);
        CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
        tids[i] = t[i].tid;
    }
    CT_CHECK(ct_wait_blocked(tids, NT, CT_WAIT_MS), "faulting threads did not block on their faults");
    e = lthread_start(&l, f, &x, stop, 8, CUFFD_FALLBACK_POISON);
    CT_CHECK(e == 0, "loop thread: %s", ct_err(e));
    for (int i = 0; i < NT; i++)
        CT_CHECK(ct_touch_join(&t[i], CT_WAIT_MS) == 0, "thread %d still blocked (%zu of %zu pages)", i,
                 t[i].touched, per);
    e = lthread_stop(&l, stop);
    CT_CHECK(e == 0, "loop did not stop: %s", ct_err(e));
    CT_CHECK(l.ret == 0, "cuffd_loop_run returned %s", ct_err(l.ret));
    const struct cuffd_loop_stats *s = &l.st;
    CT_CHECK(s->faults_missing == n && s->messages == n, "stats: %llu missing faults, %llu messages for %zu pages",
             (unsigned long long)s->faults_missing, (unsigned long long)s->messages, n);
    CT_CHECK(s->ops[CUFFD_OP_COPY] == n && s->bytes == n * f->ps, "stats: %llu COPY ops, %llu bytes",
             (unsigned long long)s->ops[CUFFD_OP_COPY], (unsigned long long)s->bytes);
    CT_CHECK(s->existed == 0 && s->gone == 0 && s->fallbacks == 0 && s->failures == 0 && s->retries == 0,
             "stats: existed %llu gone %llu fallbacks %llu failures %llu retries %llu",
             (unsigned long long)s->existed, (unsigned long long)s->gone, (unsigned long long)s->fallbacks,
             (unsigned long long)s->failures, (unsigned long long)s->retries);
    CT_CHECK(s->reads >= 1 && s->reads < s->messages, "stats: %llu reads for %llu messages",
             (unsigned long long)s->reads, (unsigned long long)s->messages);
    CT_CHECK(x.max_batch >= 2 && x.max_batch <= 8, "largest batch %zu, expected 2..8", x.max_batch);
    CT_CHECK(x.outcomes[CUFFD_OUTCOME_RESOLVED] == (int)n, "complete callback saw %d RESOLVED of %zu",
             x.outcomes[CUFFD_OUTCOME_RESOLVED], n);
    CT_CHECK(s->stop_drained == 0, "stop_drained %llu with nothing pending", (unsigned long long)s->stop_drained);
    for (size_t i = 0; i < n; i++)
        CT_CHECK(ct_check_pattern(f->base + i * f->ps, f->ps, i) < 0, "page %zu wrong", i);
out:
    if (l.running) lthread_stop(&l, stop);
    if (stop >= 0) close(stop);
    return rc;
}

static int loop_fallback(struct ct_fix *f, int fallback, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct lctx x;
    struct lthread l = {0};
    int stop = -1;
    int e = cuffd_register(f->uffd, U(f->base), 4 * f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    lctx_init(&x, f, 1);
    e = lthread_start(&l, f, &x, stop, 4, fallback);
    CT_CHECK(e == 0, "loop thread: %s", ct_err(e));
    // Page 1 cannot be served: the thread that wants it must still be released.
    struct ct_toucher bad = {.addr = f->base + f->ps + 8, .count = 1, .catch_sigbus = 1};
    struct ct_toucher good0 = {.addr = f->base, .count = 1, .catch_sigbus = 1};
    struct ct_toucher good23 = {.addr = f->base + 2 * f->ps, .count = 2, .stride = f->ps, .catch_sigbus = 1};
    e = ct_touch_start(&bad);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&bad, CT_WAIT_MS) == 0, "the thread whose fault failed is still blocked");
    if (fallback == CUFFD_FALLBACK_POISON) {
        CT_CHECK(bad.sigbus == 1, "POISON fallback: the faulting thread got no SIGBUS (read 0x%llx)",
                 (unsigned long long)bad.sum);
        CT_CHECK((uintptr_t)bad.sigbus_addr >= U(f->base + f->ps) && (uintptr_t)bad.sigbus_addr < U(f->base + 2 * f->ps),
                 "SIGBUS at %p, outside page 1", bad.sigbus_addr);
    } else {
        CT_CHECK(bad.sigbus == 0 && bad.touched == 1 && bad.sum == 0,
                 "ZEROPAGE fallback: sigbus %d, read 0x%llx (expected zero data)", bad.sigbus,
                 (unsigned long long)bad.sum);
        CT_CHECK(ct_check_zero(f->base + f->ps, f->ps) < 0, "page 1 not zero after the fallback");
    }
    // The other pages go on as usual.
    e = ct_touch_start(&good0);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    e = ct_touch_start(&good23);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&good0, CT_WAIT_MS) == 0 && ct_touch_join(&good23, CT_WAIT_MS) == 0,
             "neighbours blocked");
    CT_CHECK(!good0.sigbus && !good23.sigbus && good0.touched == 1 && good23.touched == 2,
             "neighbours of the failed page got SIGBUS or stopped early");
    e = lthread_stop(&l, stop);
    CT_CHECK(e == 0, "loop did not stop: %s", ct_err(e));
    CT_CHECK(l.ret == 0, "cuffd_loop_run returned %s", ct_err(l.ret));
    const struct cuffd_loop_stats *s = &l.st;
    CT_CHECK(s->ops[CUFFD_OP_FAIL] == 1 && s->fallbacks == 1 && s->failures == 0,
             "stats: FAIL ops %llu fallbacks %llu failures %llu, expected 1 1 0",
             (unsigned long long)s->ops[CUFFD_OP_FAIL], (unsigned long long)s->fallbacks,
             (unsigned long long)s->failures);
    CT_CHECK(x.fail_outcome == CUFFD_OUTCOME_FALLBACK && x.fail_error == EIO,
             "complete callback: outcome %d error %d, expected FALLBACK with EIO", x.fail_outcome, x.fail_error);
    CT_CHECK(s->faults_missing == 4 && s->ops[CUFFD_OP_COPY] == 3, "stats: %llu faults, %llu COPY ops",
             (unsigned long long)s->faults_missing, (unsigned long long)s->ops[CUFFD_OP_COPY]);
    CT_CHECK(ct_check_pattern(f->base, f->ps, 0) < 0 && ct_check_pattern(f->base + 3 * f->ps, f->ps, 3) < 0,
             "neighbour data wrong");
out:
    if (l.running) lthread_stop(&l, stop);
    if (stop >= 0) close(stop);
    return rc;
}

static int t_loop_fallback_poison(struct ct_fix *f, char *msg, size_t msglen) {
    return loop_fallback(f, CUFFD_FALLBACK_POISON, msg, msglen);
}

static int t_loop_fallback_zeropage(struct ct_fix *f, char *msg, size_t msglen) {
    return loop_fallback(f, CUFFD_FALLBACK_ZEROPAGE, msg, msglen);
}

static int t_loop_stop_drains(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct lctx x;
    struct lthread l = {0};
    int stop = -1;
    struct ct_toucher t[NT];
    pid_t tids[NT];
    int e = cuffd_register(f->uffd, U(f->base), NT * f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    lctx_init(&x, f, -1);
    for (int i = 0; i < NT; i++) {
        t[i] = (struct ct_toucher){.addr = f->base + i * f->ps, .count = 1};
        e = ct_touch_start(&t[i]);
        CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
        tids[i] = t[i].tid;
    }
    CT_CHECK(ct_wait_blocked(tids, NT, CT_WAIT_MS), "faulting threads did not block on their faults");
    // Stop is requested before the loop ever runs: the queued faults must still be served.
    uint64_t one = 1;
    CT_CHECK(write(stop, &one, sizeof one) == sizeof one, "eventfd write: %s", ct_err(errno));
    e = lthread_start(&l, f, &x, stop, 1, CUFFD_FALLBACK_ZEROPAGE);
    CT_CHECK(e == 0, "loop thread: %s", ct_err(e));
    CT_CHECK(ct_join(l.th, CT_WAIT_MS) == 0, "the stopping loop did not return");
    l.running = false;
    CT_CHECK(l.ret == 0, "cuffd_loop_run returned %s", ct_err(l.ret));
    for (int i = 0; i < NT; i++)
        CT_CHECK(ct_touch_join(&t[i], CT_WAIT_MS) == 0, "thread %d, faulted before the stop, still blocked", i);
    CT_CHECK(l.st.stop_drained == NT, "stop_drained %llu, expected %d", (unsigned long long)l.st.stop_drained, NT);
    CT_CHECK(l.st.ops[CUFFD_OP_COPY] == NT && l.st.fallbacks == 0, "stats: %llu COPY, %llu fallbacks",
             (unsigned long long)l.st.ops[CUFFD_OP_COPY], (unsigned long long)l.st.fallbacks);
    for (int i = 0; i < NT; i++)
        CT_CHECK(ct_check_pattern(f->base + i * f->ps, f->ps, (size_t)i) < 0, "page %d wrong", i);
out:
    if (l.running) lthread_stop(&l, stop);
    if (stop >= 0) close(stop);
    return rc;
}

struct dontneed {
    pthread_t th;
    char *addr;
    size_t len;
    volatile pid_t tid;
    atomic_int started, done;
    int ret;
};

static void *dontneed_main(void *a) {
    struct dontneed *d = a;
    d->tid = cuffd_gettid();
    atomic_store(&d->started, 1);
    d->ret = madvise(d->addr, d->len, MADV_DONTNEED) ? -errno : 0;
    atomic_store(&d->done, 1);
    return NULL;
}

// The EAGAIN scenario both tests below run: page 0's fault is queued, then a REMOVE (an
// MADV_DONTNEED of the populated page 3) behind it; the loop (decider context x, one message per
// read, ZEROPAGE fallback) reads the fault first (faults are dequeued before events), its
// resolution meets EAGAIN, and the fault must be kept and retried, not lost. Returns once the
// faulting thread and the madvise have both finished and the loop has stopped; *l holds its stats.
static int run_fault_behind_remove(struct ct_fix *f, struct lctx *x, struct lthread *l, char *msg,
                                   size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct dontneed d = {0};
    bool dstarted = false;
    int stop = -1;
    int64_t done;
    int e = cuffd_register(f->uffd, U(f->base), 4 * f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    e = cuffd_copy(f->uffd, U(f->base + 3 * f->ps), U(f->src + 3 * f->ps), f->ps, 0, &done);
    CT_CHECK(e == 0, "COPY page 3: %s", ct_err(e));
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    struct ct_toucher t = {.addr = f->base, .count = 1};
    e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    pid_t tid = t.tid;
    CT_CHECK(ct_wait_blocked(&tid, 1, CT_WAIT_MS), "faulting thread did not block");
    d = (struct dontneed){.addr = f->base + 3 * f->ps, .len = f->ps};
    e = pthread_create(&d.th, NULL, dontneed_main, &d);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    dstarted = true;
    while (!atomic_load(&d.started)) usleep(1000);
    tid = d.tid;
    CT_CHECK(ct_wait_blocked(&tid, 1, CT_WAIT_MS), "MADV_DONTNEED did not block on its REMOVE event");
    e = lthread_start(l, f, x, stop, 1, CUFFD_FALLBACK_ZEROPAGE);
    CT_CHECK(e == 0, "loop thread: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "the fault was lost: its thread is still blocked");
    CT_CHECK(ct_join(d.th, CT_WAIT_MS) == 0, "MADV_DONTNEED still blocked");
    dstarted = false;
    CT_CHECK(d.ret == 0, "madvise: %s", ct_err(d.ret));
    e = lthread_stop(l, stop);
    CT_CHECK(e == 0, "loop did not stop: %s", ct_err(e));
out:
    if (l->running) lthread_stop(l, stop);
    if (dstarted) ct_join(d.th, 1000);
    if (stop >= 0) close(stop);
    return rc;
}

static int t_loop_eagain_retry(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct lctx x;
    struct lthread l = {0};
    lctx_init(&x, f, -1);
    rc = run_fault_behind_remove(f, &x, &l, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    const struct cuffd_loop_stats *s = &l.st;
    CT_CHECK(s->retries >= 1, "no EAGAIN retry counted: the race was not exercised (reads %llu)",
             (unsigned long long)s->reads);
    CT_CHECK(s->events[CUFFD_EVENT_SLOT_REMOVE] == 1 && s->faults_missing == 1, "stats: %llu REMOVE events, %llu faults",
             (unsigned long long)s->events[CUFFD_EVENT_SLOT_REMOVE], (unsigned long long)s->faults_missing);
    CT_CHECK(s->ops[CUFFD_OP_COPY] == 1 + s->retries && s->bytes == f->ps && s->fallbacks == 0 && s->failures == 0,
             "stats: COPY ops %llu retries %llu bytes %llu fallbacks %llu failures %llu",
             (unsigned long long)s->ops[CUFFD_OP_COPY], (unsigned long long)s->retries,
             (unsigned long long)s->bytes, (unsigned long long)s->fallbacks, (unsigned long long)s->failures);
    CT_CHECK(ct_check_pattern(f->base, f->ps, 0) < 0, "page 0 wrong");
out:
    return rc;
}

// A fault whose decision fails (OP_FAIL) while a REMOVE is queued: the fallback's ZEROPAGE meets
// EAGAIN. The fault is kept (outcome RETRY in the batch, error the op's EIO), decided again after
// the event is read, and ends with one fallback. Before, it ended FAILED and was woken: a second
// fault on the same page, a second failure.
static int t_loop_fallback_eagain(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct lctx x;
    struct lthread l = {0};
    lctx_init(&x, f, 0);
    rc = run_fault_behind_remove(f, &x, &l, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    const struct cuffd_loop_stats *s = &l.st;
    CT_CHECK(s->retries >= 1 && x.kept == (int)s->retries, "retries %llu, kept faults seen %d: the fallback's EAGAIN was not kept",
             (unsigned long long)s->retries, x.kept);
    CT_CHECK(x.kept_error == EIO, "a kept fault's error is %s, want the op's EIO", ct_err(x.kept_error));
    CT_CHECK(s->faults_missing == 1 && s->fallbacks == 1 && s->failures == 0,
             "stats: %llu faults, %llu fallbacks, %llu failures (want 1, 1, 0: one fault, one fallback)",
             (unsigned long long)s->faults_missing, (unsigned long long)s->fallbacks, (unsigned long long)s->failures);
    CT_CHECK(x.outcomes[CUFFD_OUTCOME_FALLBACK] == 1 && x.outcomes[CUFFD_OUTCOME_FAILED] == 0,
             "outcomes: %d FALLBACK, %d FAILED", x.outcomes[CUFFD_OUTCOME_FALLBACK], x.outcomes[CUFFD_OUTCOME_FAILED]);
    CT_CHECK(ct_present(f->base) == 1, "page 0 was never filled");
    for (size_t k = 0; k < f->ps; k++) CT_CHECK(f->base[k] == 0, "page 0 byte %zu is not zero", k);
out:
    return rc;
}

// A decider that answers every fault with one COPY of two pages, [dst, dst+2ps) from src, and
// records what the loop made of each attempt.
struct pctx {
    uint64_t dst, src, ps;
    int attempts;
    struct cuffd_resolution last; // the latest performed attempt
};

static void partial_decide(void *c, const struct uffd_msg *msgs, struct cuffd_resolution *res, size_t n) {
    struct pctx *x = c;
    for (size_t i = 0; i < n; i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
        res[i].op = CUFFD_OP_COPY;
        res[i].dst = x->dst;
        res[i].len = 2 * x->ps;
        res[i].src = x->src;
    }
}

static void partial_complete(void *c, const struct uffd_msg *msgs, const struct cuffd_resolution *res, size_t n) {
    struct pctx *x = c;
    for (size_t i = 0; i < n; i++) {
        // A kept fault (EAGAIN) shows up with outcome RETRY; only finished attempts count.
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT || res[i].outcome == CUFFD_OUTCOME_NONE ||
            res[i].outcome == CUFFD_OUTCOME_RETRY)
            continue;
        x->attempts++;
        x->last = res[i];
    }
}

// EAGAIN after partial progress, made by the kernel: a two-page COPY whose second source page is
// registered with a second uffd. The kernel copies page 0, drops mmap_lock to fault the source in
// (blocking on uffd2), and meanwhile a MADV_DONTNEED queues a REMOVE (mmap_changing). When uffd2
// is resolved the COPY returns copy=ps with EAGAIN. The loop must count those bytes, read the
// event and go on at dst+ps; starting again at dst meets EEXIST on page 0 and never fills page 1.
static int t_loop_eagain_partial(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct pctx x = {0};
    struct lthread l = {0};
    struct dontneed d = {0};
    bool dstarted = false;
    int stop = -1, uffd2 = -1;
    char *srcmap = MAP_FAILED;
    int64_t done;
    int e = cuffd_register(f->uffd, U(f->base), 4 * f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    e = cuffd_copy(f->uffd, U(f->base + 3 * f->ps), U(f->src + 3 * f->ps), f->ps, 0, &done);
    CT_CHECK(e == 0, "COPY page 3: %s", ct_err(e));
    // The source: page 0 present, page 1 missing under uffd2, which must take the kernel's own
    // fault (copy_from_user in UFFDIO_COPY), so it is opened without USER_MODE_ONLY.
    srcmap = mmap(NULL, 2 * f->ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CT_CHECK(srcmap != MAP_FAILED, "mmap: %s", ct_err(errno));
    memcpy(srcmap, f->src, f->ps);
    uffd2 = cuffd_open(CUFFD_OPEN_NONBLOCK, NULL, NULL);
    if (uffd2 == -EPERM || uffd2 == -EACCES) CT_SKIP("a uffd for kernel faults needs privileges: %s", ct_err(uffd2));
    CT_CHECK(uffd2 >= 0, "open uffd2: %s", ct_err(uffd2));
    uint64_t g, io;
    e = cuffd_api(uffd2, 0, &g, &io);
    CT_CHECK(e == 0, "UFFDIO_API on uffd2: %s", ct_err(e));
    e = cuffd_register(uffd2, U(srcmap + f->ps), f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register source page 1: %s", ct_err(e));
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    x = (struct pctx){.dst = U(f->base), .src = U(srcmap), .ps = f->ps};
    memset(&l, 0, sizeof l);
    l.cfg = (struct cuffd_loop_config){
        .uffd = f->uffd, .stop_fd = stop, .batch = 1, .fallback = CUFFD_FALLBACK_ZEROPAGE,
        .features = f->features, .decide = partial_decide, .complete = partial_complete, .ctx = &x,
    };
    e = pthread_create(&l.th, NULL, lthread_main, &l);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    l.running = true;
    struct ct_toucher t = {.addr = f->base, .count = 1};
    e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    // The loop's COPY is now blocked in the kernel on source page 1.
    struct uffd_msg m;
    e = ct_read_msg(uffd2, &m, CT_WAIT_MS);
    CT_CHECK(e == 1, "the COPY never faulted on its source page (%s)", e == 0 ? "timeout" : ct_err(e));
    CT_CHECK(m.event == UFFD_EVENT_PAGEFAULT && (m.arg.pagefault.address & ~(f->ps - 1)) == U(srcmap + f->ps),
             "uffd2 message: event %u at %llx", m.event, (unsigned long long)m.arg.pagefault.address);
    d = (struct dontneed){.addr = f->base + 3 * f->ps, .len = f->ps};
    e = pthread_create(&d.th, NULL, dontneed_main, &d);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    dstarted = true;
    while (!atomic_load(&d.started)) usleep(1000);
    pid_t tid = d.tid;
    CT_CHECK(ct_wait_blocked(&tid, 1, CT_WAIT_MS), "MADV_DONTNEED did not block on its REMOVE event");
    // Release the source page: the kernel's COPY goes on, finds mmap_changing and stops with
    // one page done.
    e = cuffd_copy(uffd2, U(srcmap + f->ps), U(f->src + f->ps), f->ps, 0, &done);
    CT_CHECK(e == 0, "resolve source page 1: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "the faulting thread is still blocked");
    CT_CHECK(ct_join(d.th, CT_WAIT_MS) == 0, "MADV_DONTNEED still blocked");
    dstarted = false;
    e = lthread_stop(&l, stop);
    CT_CHECK(e == 0, "loop did not stop: %s", ct_err(e));
    const struct cuffd_loop_stats *s = &l.st;
    // The retry may meet EAGAIN again until the madvise thread has run after its event was read.
    CT_CHECK(s->retries >= 1, "retries %llu: the partial EAGAIN was not exercised",
             (unsigned long long)s->retries);
    CT_CHECK(x.attempts == 1 && x.last.outcome == CUFFD_OUTCOME_RESOLVED,
             "the retry ended as outcome %u error %s (attempts seen %d): it did not continue after the done page",
             x.last.outcome, ct_err(x.last.error), x.attempts);
    CT_CHECK(x.last.dst == U(f->base + f->ps) && x.last.len == f->ps && x.last.src == U(srcmap + f->ps),
             "the retry went to %llx+%llu from %llx, not to the page after the done one",
             (unsigned long long)x.last.dst, (unsigned long long)x.last.len, (unsigned long long)x.last.src);
    CT_CHECK(s->bytes == 2 * f->ps && s->existed == 0,
             "stats: bytes %llu (want %llu: the first attempt's page counts too), existed %llu",
             (unsigned long long)s->bytes, (unsigned long long)(2 * f->ps), (unsigned long long)s->existed);
    CT_CHECK(ct_present(f->base + f->ps) == 1, "page 1 was never filled");
    CT_CHECK(ct_check_pattern(f->base, f->ps, 0) < 0, "page 0 wrong");
    CT_CHECK(ct_check_pattern(f->base + f->ps, f->ps, 1) < 0, "page 1 wrong");
out:
    if (l.running) lthread_stop(&l, stop);
    if (dstarted) ct_join(d.th, 1000);
    if (stop >= 0) close(stop);
    if (uffd2 >= 0) close(uffd2);
    if (srcmap != MAP_FAILED && !atomic_load(&ct_abandoned)) munmap(srcmap, 2 * f->ps);
    return rc;
}

static int t_loop_eexist_wakes(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct lctx x;
    struct lthread l = {0};
    int stop = -1;
    struct ct_toucher t[2];
    pid_t tids[2];
    int e = cuffd_register(f->uffd, U(f->base), 2 * f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    lctx_init(&x, f, -1);
    // Two threads fault on the same page before the loop runs: two messages, one page.
    for (int i = 0; i < 2; i++) {
        t[i] = (struct ct_toucher){.addr = f->base + 64 * (size_t)i, .count = 1};
        e = ct_touch_start(&t[i]);
        CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
        tids[i] = t[i].tid;
    }
    CT_CHECK(ct_wait_blocked(tids, 2, CT_WAIT_MS), "faulting threads did not block");
    e = lthread_start(&l, f, &x, stop, 8, CUFFD_FALLBACK_POISON);
    CT_CHECK(e == 0, "loop thread: %s", ct_err(e));
    for (int i = 0; i < 2; i++)
        CT_CHECK(ct_touch_join(&t[i], CT_WAIT_MS) == 0, "thread %d still blocked", i);
    e = lthread_stop(&l, stop);
    CT_CHECK(e == 0, "loop did not stop: %s", ct_err(e));
    const struct cuffd_loop_stats *s = &l.st;
    CT_CHECK(s->faults_missing == 2 && s->ops[CUFFD_OP_COPY] == 2, "stats: %llu faults, %llu COPY ops",
             (unsigned long long)s->faults_missing, (unsigned long long)s->ops[CUFFD_OP_COPY]);
    CT_CHECK(s->existed == 1 && x.outcomes[CUFFD_OUTCOME_EXISTED] == 1 && x.outcomes[CUFFD_OUTCOME_RESOLVED] == 1,
             "stats: existed %llu; outcomes RESOLVED %d EXISTED %d, expected one each",
             (unsigned long long)s->existed, x.outcomes[CUFFD_OUTCOME_RESOLVED], x.outcomes[CUFFD_OUTCOME_EXISTED]);
    CT_CHECK(s->bytes == f->ps && s->fallbacks == 0 && s->failures == 0, "stats: bytes %llu fallbacks %llu failures %llu",
             (unsigned long long)s->bytes, (unsigned long long)s->fallbacks, (unsigned long long)s->failures);
    CT_CHECK(ct_check_pattern(f->base, f->ps, 0) < 0, "page 0 wrong");
out:
    if (l.running) lthread_stop(&l, stop);
    if (stop >= 0) close(stop);
    return rc;
}

#define NSPIN 16

// One attempt: returns PASS, FAIL, or SKIP when the drain limit was not reached this time.
static int stop_under_load_once(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct lctx x, y;
    struct lthread l = {0}, l2 = {0};
    struct ct_toucher t[NSPIN];
    int stop = eventfd(0, EFD_CLOEXEC), stop2 = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0 && stop2 >= 0, "eventfd: %s", ct_err(errno));
    // A decider that only wakes: every thread re-faults at once, so the queue never empties
    // and a stopping loop has to give up draining at some point.
    lctx_init(&x, f, -1);
    x.wake_only = true;
    int e = lthread_start(&l, f, &x, stop, 1, CUFFD_FALLBACK_POISON);
    CT_CHECK(e == 0, "loop thread: %s", ct_err(e));
    for (int i = 0; i < NSPIN; i++) {
        t[i] = (struct ct_toucher){.addr = f->base + (size_t)i * f->ps, .count = 1};
        e = ct_touch_start(&t[i]);
        CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    }
    usleep(20000);
    e = lthread_stop(&l, stop);
    CT_CHECK(e == 0, "a stopping loop under a never-ending fault stream did not return: %s", ct_err(e));
    CT_CHECK(l.ret == 0, "cuffd_loop_run returned %s", ct_err(l.ret));
    // Whatever the first loop read and did not resolve must not be lost: it must come back on
    // the queue, where a second loop that answers with COPY releases every thread.
    lctx_init(&y, f, -1);
    e = lthread_start(&l2, f, &y, stop2, 8, CUFFD_FALLBACK_POISON);
    CT_CHECK(e == 0, "loop thread: %s", ct_err(e));
    for (int i = 0; i < NSPIN; i++) {
        if (ct_touch_join(&t[i], CT_WAIT_MS) == 0) continue;
        CT_FAIL("thread %d is still blocked after the first loop stopped (it drained %llu faults, %llu reads): "
                "its fault was read and dropped", i, (unsigned long long)l.st.stop_drained,
                (unsigned long long)l.st.reads);
    }
    e = lthread_stop(&l2, stop2);
    CT_CHECK(e == 0, "second loop did not stop: %s", ct_err(e));
    for (int i = 0; i < NSPIN; i++)
        CT_CHECK(ct_check_pattern(f->base + (size_t)i * f->ps, f->ps, (size_t)i) < 0, "page %d wrong", i);
    if (l.st.stop_drained < 1024) {
        snprintf(msg, msglen, "the stopping loop emptied the queue after %llu faults: drain limit not reached",
                 (unsigned long long)l.st.stop_drained);
        rc = CUFFD_TEST_SKIP;
    }
out:
    if (l2.running) lthread_stop(&l2, stop2);
    if (l.running) lthread_stop(&l, stop);
    if (stop >= 0) close(stop);
    if (stop2 >= 0) close(stop2);
    return rc;
}

static int t_loop_stop_under_load(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    int e = cuffd_register(f->uffd, U(f->base), NSPIN * f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    // The drain limit is reached only when the faulting threads keep the queue non-empty for
    // every round, which depends on scheduling: try a few times.
    for (int attempt = 0; attempt < 20; attempt++) {
        if (attempt) CT_CHECK(madvise(f->base, NSPIN * f->ps, MADV_DONTNEED) == 0, "madvise: %s", ct_err(errno));
        rc = stop_under_load_once(f, msg, msglen);
        if (rc != CUFFD_TEST_SKIP) goto out;
    }
    // Still SKIP: msg says the limit was never reached.
out:
    return rc;
}

// Several loops on one uffd (or one busy-polling loop): every fault is read by exactly one.
static int loops_share(struct ct_fix *f, int nloops, uint32_t spin, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct lctx x[2];
    struct lthread l[2] = {0};
    int stop = -1;
    const size_t n = f->npages, per = n / NT;
    struct ct_toucher t[NT];
    int e = cuffd_register(f->uffd, U(f->base), n * f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    for (int j = 0; j < nloops; j++) {
        lctx_init(&x[j], f, -1);
        next_spin_polls = spin;
        e = lthread_start(&l[j], f, &x[j], stop, 4, CUFFD_FALLBACK_POISON);
        CT_CHECK(e == 0, "loop thread: %s", ct_err(e));
    }
    for (int i = 0; i < NT; i++) {
        t[i] = (struct ct_toucher){.addr = f->base + i * per * f->ps, .count = per, .stride = f->ps};
        e = ct_touch_start(&t[i]);
        CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    }
    for (int i = 0; i < NT; i++)
        CT_CHECK(ct_touch_join(&t[i], CT_WAIT_MS) == 0, "thread %d still blocked (%zu of %zu pages)", i,
                 t[i].touched, per);
    // One eventfd write stops every loop: none of them consumes it.
    uint64_t one = 1;
    CT_CHECK(write(stop, &one, sizeof one) == sizeof one, "eventfd: %s", ct_err(errno));
    uint64_t msgs = 0, copies = 0, bytes = 0, bad = 0;
    for (int j = 0; j < nloops; j++) {
        CT_CHECK(ct_join(l[j].th, CT_WAIT_MS) == 0, "loop %d did not stop", j);
        l[j].running = false;
        CT_CHECK(l[j].ret == 0, "loop %d returned %s", j, ct_err(l[j].ret));
        msgs += l[j].st.messages;
        copies += l[j].st.ops[CUFFD_OP_COPY];
        bytes += l[j].st.bytes;
        bad += l[j].st.existed + l[j].st.fallbacks + l[j].st.failures + l[j].st.gone;
    }
    CT_CHECK(msgs == n && copies == n && bytes == n * f->ps && bad == 0,
             "over %d loops: %llu messages, %llu COPY, %llu bytes, %llu existed/fallback/failed for %zu pages",
             nloops, (unsigned long long)msgs, (unsigned long long)copies, (unsigned long long)bytes,
             (unsigned long long)bad, n);
    for (size_t i = 0; i < n; i++)
        CT_CHECK(ct_check_pattern(f->base + i * f->ps, f->ps, i) < 0, "page %zu wrong", i);
out:
    for (int j = 0; j < nloops; j++)
        if (l[j].running) lthread_stop(&l[j], stop);
    if (stop >= 0) close(stop);
    return rc;
}

static int t_loop_two_loops(struct ct_fix *f, char *msg, size_t msglen) {
    return loops_share(f, 2, 0, msg, msglen);
}

static int t_loop_busy_poll(struct ct_fix *f, char *msg, size_t msglen) {
    return loops_share(f, 1, 2000, msg, msglen);
}

// MINOR faults answered with CONTINUE, one OP_FAIL answered by the ZEROPAGE fallback, which for
// a minor fault means CONTINUE: the thread sees the page cache.
static int t_loop_minor(struct ct_fix *f, char *msg, size_t msglen) {
    int kind = f->kind;
    int rc = CUFFD_TEST_PASS;
    struct lctx x;
    struct lthread l = {0};
    int stop = -1;
    if (kind == CUFFD_MEM_ANON) {
        snprintf(msg, msglen, "minor faults apply to shmem and hugetlb only");
        return CUFFD_TEST_SKIP;
    }
    for (size_t i = 0; i < 4; i++) memcpy(f->alias + i * f->ps, f->src + i * f->ps, f->ps);
    int e = cuffd_register(f->uffd, U(f->base), 4 * f->ps, UFFDIO_REGISTER_MODE_MINOR, NULL);
    CT_CHECK(e == 0, "register MINOR: %s", ct_err(e));
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    lctx_init(&x, f, 2);
    x.op = CUFFD_OP_CONTINUE;
    e = lthread_start(&l, f, &x, stop, 4, CUFFD_FALLBACK_ZEROPAGE);
    CT_CHECK(e == 0, "loop thread: %s", ct_err(e));
    struct ct_toucher t = {.addr = f->base, .count = 4, .stride = f->ps};
    e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "reader still blocked (%zu of 4 pages)", t.touched);
    e = lthread_stop(&l, stop);
    CT_CHECK(e == 0, "loop did not stop: %s", ct_err(e));
    const struct cuffd_loop_stats *s = &l.st;
    CT_CHECK(s->faults_minor == 4 && s->faults_missing == 0 && s->faults_wp == 0,
             "stats: minor %llu missing %llu wp %llu, expected 4 0 0", (unsigned long long)s->faults_minor,
             (unsigned long long)s->faults_missing, (unsigned long long)s->faults_wp);
    CT_CHECK(s->ops[CUFFD_OP_CONTINUE] == 3 && s->ops[CUFFD_OP_FAIL] == 1 && s->fallbacks == 1 && s->failures == 0,
             "stats: CONTINUE %llu FAIL %llu fallbacks %llu failures %llu",
             (unsigned long long)s->ops[CUFFD_OP_CONTINUE], (unsigned long long)s->ops[CUFFD_OP_FAIL],
             (unsigned long long)s->fallbacks, (unsigned long long)s->failures);
    for (size_t i = 0; i < 4; i++)
        CT_CHECK(ct_check_pattern(f->base + i * f->ps, f->ps, i) < 0, "page %zu does not show the page cache", i);
out:
    if (l.running) lthread_stop(&l, stop);
    if (stop >= 0) close(stop);
    return rc;
}

// WP faults answered with UNPROTECT; one OP_FAIL: the fallback for a WP fault unprotects.
static int t_loop_wp(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct lctx x;
    struct lthread l = {0};
    int stop = -1;
    memcpy(f->base, f->src, 4 * f->ps);
    int e = cuffd_register(f->uffd, U(f->base), 4 * f->ps, UFFDIO_REGISTER_MODE_WP, NULL);
    CT_CHECK(e == 0, "register WP: %s", ct_err(e));
    e = cuffd_writeprotect(f->uffd, U(f->base), 4 * f->ps, true, false);
    CT_CHECK(e == 0, "protect: %s", ct_err(e));
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    lctx_init(&x, f, 1);
    x.op = CUFFD_OP_UNPROTECT;
    // Even with the POISON fallback, a failed WP fault is only unprotected: the data is there.
    e = lthread_start(&l, f, &x, stop, 4, CUFFD_FALLBACK_POISON);
    CT_CHECK(e == 0, "loop thread: %s", ct_err(e));
    struct ct_toucher t = {.addr = f->base + 8, .count = 4, .stride = f->ps, .write = 1, .wval = 0xEE,
                           .catch_sigbus = 1};
    e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "writer still blocked (%zu of 4 pages)", t.touched);
    CT_CHECK(!t.sigbus && t.touched == 4, "writer got SIGBUS at %p after %zu pages", t.sigbus_addr, t.touched);
    e = lthread_stop(&l, stop);
    CT_CHECK(e == 0, "loop did not stop: %s", ct_err(e));
    const struct cuffd_loop_stats *s = &l.st;
    CT_CHECK(s->faults_wp == 4 && s->faults_missing == 0, "stats: wp %llu missing %llu, expected 4 0",
             (unsigned long long)s->faults_wp, (unsigned long long)s->faults_missing);
    CT_CHECK(s->ops[CUFFD_OP_UNPROTECT] == 3 && s->ops[CUFFD_OP_FAIL] == 1 && s->fallbacks == 1 && s->failures == 0,
             "stats: UNPROTECT %llu FAIL %llu fallbacks %llu failures %llu",
             (unsigned long long)s->ops[CUFFD_OP_UNPROTECT], (unsigned long long)s->ops[CUFFD_OP_FAIL],
             (unsigned long long)s->fallbacks, (unsigned long long)s->failures);
    for (size_t i = 0; i < 4; i++) {
        CT_CHECK((uint8_t)f->base[i * f->ps + 8] == 0xEE, "write to page %zu lost", i);
        CT_CHECK((uint8_t)f->base[i * f->ps + 9] == ct_pat(i, 9), "page %zu data changed", i);
    }
out:
    if (l.running) lthread_stop(&l, stop);
    if (stop >= 0) close(stop);
    return rc;
}

// The header says DONTWAKE is the loop's business: a decider that sets it must not leave the
// faulting thread asleep.
static int t_loop_dontwake_managed(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct lctx x;
    struct lthread l = {0};
    int stop = -1;
    struct ct_toucher t[NT];
    int e = cuffd_register(f->uffd, U(f->base), NT * f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    lctx_init(&x, f, -1);
    x.mode = UFFDIO_COPY_MODE_DONTWAKE;
    e = lthread_start(&l, f, &x, stop, 4, CUFFD_FALLBACK_POISON);
    CT_CHECK(e == 0, "loop thread: %s", ct_err(e));
    for (int i = 0; i < NT; i++) {
        t[i] = (struct ct_toucher){.addr = f->base + (size_t)i * f->ps, .count = 1};
        e = ct_touch_start(&t[i]);
        CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    }
    for (int i = 0; i < NT; i++)
        CT_CHECK(ct_touch_join(&t[i], CT_WAIT_MS) == 0,
                 "thread %d still asleep: the decider's DONTWAKE reached the kernel and nobody woke it", i);
    e = lthread_stop(&l, stop);
    CT_CHECK(e == 0, "loop did not stop: %s", ct_err(e));
    CT_CHECK(l.st.ops[CUFFD_OP_COPY] == NT && l.st.faults_missing == NT, "stats: %llu COPY, %llu faults",
             (unsigned long long)l.st.ops[CUFFD_OP_COPY], (unsigned long long)l.st.faults_missing);
    for (int i = 0; i < NT; i++)
        CT_CHECK(ct_check_pattern(f->base + (size_t)i * f->ps, f->ps, (size_t)i) < 0, "page %d wrong", i);
out:
    if (l.running) lthread_stop(&l, stop);
    if (stop >= 0) close(stop);
    return rc;
}

// A decider whose resolution misses the faulting page (here: COPY into a page that already
// exists, so EEXIST) must not strand the thread: it is woken, re-faults, and is asked again.
static int t_loop_misdirected(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct lctx x;
    struct lthread l = {0};
    int stop = -1;
    int64_t done;
    int e = cuffd_register(f->uffd, U(f->base), 2 * f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    e = cuffd_copy(f->uffd, U(f->base + f->ps), U(f->src + f->ps), f->ps, 0, &done);
    CT_CHECK(e == 0, "COPY page 1: %s", ct_err(e));
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    lctx_init(&x, f, -1);
    x.misdirect = 1;
    x.misdirect_page = 1;
    e = lthread_start(&l, f, &x, stop, 4, CUFFD_FALLBACK_POISON);
    CT_CHECK(e == 0, "loop thread: %s", ct_err(e));
    struct ct_toucher t = {.addr = f->base, .count = 1};
    e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0,
             "the thread is still asleep after a resolution that missed its page (%llu faults, existed %llu)",
             (unsigned long long)l.st.faults_missing, (unsigned long long)l.st.existed);
    e = lthread_stop(&l, stop);
    CT_CHECK(e == 0, "loop did not stop: %s", ct_err(e));
    CT_CHECK(l.st.existed == 1 && l.st.faults_missing == 2 && l.st.ops[CUFFD_OP_COPY] == 2,
             "stats: existed %llu faults %llu COPY %llu, expected 1 2 2 (the re-fault asked again)",
             (unsigned long long)l.st.existed, (unsigned long long)l.st.faults_missing,
             (unsigned long long)l.st.ops[CUFFD_OP_COPY]);
    CT_CHECK(ct_check_pattern(f->base, f->ps, 0) < 0, "page 0 wrong");
out:
    if (l.running) lthread_stop(&l, stop);
    if (stop >= 0) close(stop);
    return rc;
}

// After the loop has stopped, a new fault stays queued (nobody answers it); closing the uffd
// releases the thread, which then faults normally (zeros / the file's data).
static int t_loop_close_releases(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct lctx x;
    struct lthread l = {0};
    int stop = -1;
    int e = cuffd_register(f->uffd, U(f->base), 2 * f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    lctx_init(&x, f, -1);
    e = lthread_start(&l, f, &x, stop, 4, CUFFD_FALLBACK_POISON);
    CT_CHECK(e == 0, "loop thread: %s", ct_err(e));
    e = lthread_stop(&l, stop);
    CT_CHECK(e == 0 && l.ret == 0, "loop did not stop cleanly: %s / %s", ct_err(e), ct_err(l.ret));
    struct ct_toucher t = {.addr = f->base + 3, .count = 1};
    e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    pid_t tid = t.tid;
    CT_CHECK(ct_wait_blocked(&tid, 1, CT_WAIT_MS), "the fault after the stop was not left queued");
    CT_CHECK(!atomic_load(&t.finished), "a fault after the stop was answered");
    close(f->uffd);
    f->uffd = -1;
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "closing the uffd did not release the queued fault");
    CT_CHECK(t.sum == 0, "the released thread read 0x%llx from a never-filled page", (unsigned long long)t.sum);
    CT_CHECK(l.st.messages == 0, "the stopped loop read %llu messages", (unsigned long long)l.st.messages);
out:
    if (l.running) lthread_stop(&l, stop);
    if (stop >= 0) close(stop);
    return rc;
}

// A uffd without its UFFDIO_API handshake cannot deliver faults: the loop says so (-EINVAL)
// at once instead of returning as if stopped.
static int t_loop_without_handshake(struct ct_fix *f, char *msg, size_t msglen) {
    (void)f;
    int rc = CUFFD_TEST_PASS;
    int fd = cuffd_open(CUFFD_OPEN_NONBLOCK | CUFFD_OPEN_USER_MODE_ONLY, NULL, NULL);
    if (fd < 0) {
        snprintf(msg, msglen, "cannot open a userfaultfd: %s", ct_err(-fd));
        return CUFFD_TEST_SKIP;
    }
    struct cuffd_loop_stats st;
    memset(&st, 0, sizeof st);
    struct cuffd_loop_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.uffd = fd;
    cfg.stop_fd = -1;
    cfg.batch = 4;
    cfg.decide = NULL; // never called: no message can arrive
    int e = cuffd_loop_run(&cfg, &st);
    CT_CHECK(e == -EINVAL, "loop on a uffd without UFFDIO_API returned %s, want EINVAL", ct_err(-e));
    CT_CHECK(st.messages == 0, "the loop read %llu messages", (unsigned long long)st.messages);
out:
    close(fd);
    return rc;
}

// MARK: - the table

CT_CASES(loop) = {
    {"loop_threads", t_loop_threads, CT_M_ALL, 0, 32,
     "Four threads fault; a C decider answers in batches of up to 8; every counter is exact."},
    {"loop_fallback_poison", t_loop_fallback_poison, CT_M_ALL, UFFD_FEATURE_POISON, 4,
     "OP_FAIL with the POISON fallback: the faulting thread is released with SIGBUS."},
    {"loop_fallback_zeropage", t_loop_fallback_zeropage, CT_M_ALL, 0, 4,
     "OP_FAIL with the ZEROPAGE fallback: the faulting thread is released and reads zeros."},
    {"loop_stop_drains", t_loop_stop_drains, CT_M_ANON, 0, NT,
     "Faults queued before the stop are drained and resolved (stop_drained counts them)."},
    {"loop_eagain_retry", t_loop_eagain_retry, CT_M_ANON, UFFD_FEATURE_EVENT_REMOVE, 4,
     "A REMOVE queued behind a fault: the COPY gets EAGAIN, the loop reads the event and retries."},
    {"loop_fallback_eagain", t_loop_fallback_eagain, CT_M_ANON, UFFD_FEATURE_EVENT_REMOVE, 4,
     "OP_FAIL while a REMOVE is queued: the fallback meets EAGAIN, the fault is kept (RETRY, error EIO) and ends with one fallback."},
    {"loop_eagain_partial", t_loop_eagain_partial, CT_M_ANON, UFFD_FEATURE_EVENT_REMOVE, 4,
     "EAGAIN after partial progress (a COPY whose source faults while a REMOVE is queued): the retry continues at start+done and the first attempt's bytes count."},
    {"loop_eexist_wakes", t_loop_eexist_wakes, CT_M_ANON, 0, 2,
     "Two threads fault on one page: one COPY resolves, the other gets EEXIST, is woken and counted."},
    {"loop_stop_under_load", t_loop_stop_under_load, CT_M_ANON, 0, NSPIN,
     "Stopping under a never-ending fault stream returns, and no fault it read is lost."},
    {"loop_two_loops", t_loop_two_loops, CT_M_ANON | CT_M_SHMEM, 0, 32,
     "Two loops on one uffd: every fault is read and resolved by exactly one of them."},
    {"loop_busy_poll", t_loop_busy_poll, CT_M_ANON, 0, 32,
     "spin_polls > 0 (busy-poll before poll()): same results, and stop still works."},
    {"loop_minor", t_loop_minor, CT_M_FILES, CT_F_MINOR, 4,
     "MINOR faults through the loop with CONTINUE; an OP_FAIL falls back to CONTINUE."},
    {"loop_wp", t_loop_wp, CT_M_ALL, CT_F_WP | UFFD_FEATURE_POISON, 4,
     "WP faults through the loop with UNPROTECT; an OP_FAIL on a WP fault only unprotects."},
    {"loop_dontwake_managed", t_loop_dontwake_managed, CT_M_ANON, 0, NT,
     "A decider that sets DONTWAKE in mode does not leave the faulting thread asleep (the loop manages waking)."},
    {"loop_misdirected", t_loop_misdirected, CT_M_ANON, 0, 2,
     "A resolution that misses the faulting page (EEXIST elsewhere) wakes the thread; its re-fault is asked again."},
    {"loop_close_releases", t_loop_close_releases, CT_M_ANON | CT_M_SHMEM | CT_M_HUGE, 0, 2,
     "A fault after the loop stopped stays queued; closing the uffd releases it (it faults normally)."},
    {"loop_without_handshake", t_loop_without_handshake, CT_M_ANON, 0, 0,
     "cuffd_loop_run on a uffd without UFFDIO_API is EINVAL."},
    CT_END,
};
