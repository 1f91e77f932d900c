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
    // Written on the loop's thread only; read after it is joined.
    size_t max_batch;
    int outcomes[8];
    int fail_error;
    int fail_outcome;
};

static void decide(void *c, const struct uffd_msg *msgs, struct cuffd_resolution *res, size_t n) {
    struct lctx *x = c;
    if (n > x->max_batch) x->max_batch = n;
    for (size_t i = 0; i < n; i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
        uint64_t a = msgs[i].arg.pagefault.address & ~(x->ps - 1);
        size_t idx = (size_t)((a - U(x->base)) / x->ps);
        if ((long)idx == x->fail_page) {
            res[i].op = CUFFD_OP_FAIL; // the loop's fallback picks the range
            continue;
        }
        res[i].op = CUFFD_OP_COPY;
        res[i].dst = a;
        res[i].len = x->ps;
        res[i].src = U(x->src + idx * x->ps);
    }
}

static void complete(void *c, const struct uffd_msg *msgs, const struct cuffd_resolution *res, size_t n) {
    struct lctx *x = c;
    for (size_t i = 0; i < n; i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT || res[i].op == CUFFD_OP_NONE) continue;
        if (res[i].outcome < 8) x->outcomes[res[i].outcome]++;
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

static int lthread_start(struct lthread *l, struct ct_fix *f, struct lctx *x, int stop_fd,
                         uint32_t batch, int fallback) {
    memset(l, 0, sizeof *l);
    l->cfg = (struct cuffd_loop_config){
        .uffd = f->uffd, .stop_fd = stop_fd, .batch = batch, .fallback = fallback,
        .features = f->features, .decide = decide, .complete = complete, .ctx = x,
    };
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

int cuffd_test_loop_threads(int kind, char *msg, size_t msglen) {
    int rc;
    struct ct_fix f;
    struct lctx x;
    struct lthread l = {0};
    int stop = -1;
    const size_t n = kind == CUFFD_MEM_HUGETLB ? 8 : 32, per = n / NT;
    rc = ct_fix_init(&f, kind, n, 0, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    struct ct_toucher t[NT];
    pid_t tids[NT];
    int e = cuffd_register(f.uffd, U(f.base), n * f.ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    lctx_init(&x, &f, -1);
    // The first fault of every thread is queued before the loop runs: its first read is a batch.
    for (int i = 0; i < NT; i++) {
        t[i] = (struct ct_toucher){.addr = f.base + i * per * f.ps, .count = per, .stride = f.ps};
        e = ct_touch_start(&t[i]);
        CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
        tids[i] = t[i].tid;
    }
    CT_CHECK(ct_wait_blocked(tids, NT, CT_WAIT_MS), "faulting threads did not block on their faults");
    e = lthread_start(&l, &f, &x, stop, 8, CUFFD_FALLBACK_POISON);
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
    CT_CHECK(s->ops[CUFFD_OP_COPY] == n && s->bytes == n * f.ps, "stats: %llu COPY ops, %llu bytes",
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
        CT_CHECK(ct_check_pattern(f.base + i * f.ps, f.ps, i) < 0, "page %zu wrong", i);
out:
    if (l.running) lthread_stop(&l, stop);
    if (stop >= 0) close(stop);
    ct_fix_fini(&f);
    return rc;
}

static int loop_fallback(int kind, int fallback, char *msg, size_t msglen) {
    int rc;
    struct ct_fix f;
    struct lctx x;
    struct lthread l = {0};
    int stop = -1;
    uint64_t feat = fallback == CUFFD_FALLBACK_POISON ? UFFD_FEATURE_POISON : 0;
    rc = ct_fix_init(&f, kind, 4, feat, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    int e = cuffd_register(f.uffd, U(f.base), 4 * f.ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    lctx_init(&x, &f, 1);
    e = lthread_start(&l, &f, &x, stop, 4, fallback);
    CT_CHECK(e == 0, "loop thread: %s", ct_err(e));
    // Page 1 cannot be served: the thread that wants it must still be released.
    struct ct_toucher bad = {.addr = f.base + f.ps + 8, .count = 1, .catch_sigbus = 1};
    struct ct_toucher good0 = {.addr = f.base, .count = 1, .catch_sigbus = 1};
    struct ct_toucher good23 = {.addr = f.base + 2 * f.ps, .count = 2, .stride = f.ps, .catch_sigbus = 1};
    e = ct_touch_start(&bad);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&bad, CT_WAIT_MS) == 0, "the thread whose fault failed is still blocked");
    if (fallback == CUFFD_FALLBACK_POISON) {
        CT_CHECK(bad.sigbus == 1, "POISON fallback: the faulting thread got no SIGBUS (read 0x%llx)",
                 (unsigned long long)bad.sum);
        CT_CHECK((uintptr_t)bad.sigbus_addr >= U(f.base + f.ps) && (uintptr_t)bad.sigbus_addr < U(f.base + 2 * f.ps),
                 "SIGBUS at %p, outside page 1", bad.sigbus_addr);
    } else {
        CT_CHECK(bad.sigbus == 0 && bad.touched == 1 && bad.sum == 0,
                 "ZEROPAGE fallback: sigbus %d, read 0x%llx (expected zero data)", bad.sigbus,
                 (unsigned long long)bad.sum);
        CT_CHECK(ct_check_zero(f.base + f.ps, f.ps) < 0, "page 1 not zero after the fallback");
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
    CT_CHECK(ct_check_pattern(f.base, f.ps, 0) < 0 && ct_check_pattern(f.base + 3 * f.ps, f.ps, 3) < 0,
             "neighbour data wrong");
out:
    if (l.running) lthread_stop(&l, stop);
    if (stop >= 0) close(stop);
    ct_fix_fini(&f);
    return rc;
}

int cuffd_test_loop_fallback_poison(int kind, char *msg, size_t msglen) {
    return loop_fallback(kind, CUFFD_FALLBACK_POISON, msg, msglen);
}

int cuffd_test_loop_fallback_zeropage(int kind, char *msg, size_t msglen) {
    return loop_fallback(kind, CUFFD_FALLBACK_ZEROPAGE, msg, msglen);
}

int cuffd_test_loop_stop_drains(int kind, char *msg, size_t msglen) {
    int rc;
    struct ct_fix f;
    struct lctx x;
    struct lthread l = {0};
    int stop = -1;
    rc = ct_fix_init(&f, kind, NT, 0, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    struct ct_toucher t[NT];
    pid_t tids[NT];
    int e = cuffd_register(f.uffd, U(f.base), NT * f.ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    lctx_init(&x, &f, -1);
    for (int i = 0; i < NT; i++) {
        t[i] = (struct ct_toucher){.addr = f.base + i * f.ps, .count = 1};
        e = ct_touch_start(&t[i]);
        CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
        tids[i] = t[i].tid;
    }
    CT_CHECK(ct_wait_blocked(tids, NT, CT_WAIT_MS), "faulting threads did not block on their faults");
    // Stop is requested before the loop ever runs: the queued faults must still be served.
    uint64_t one = 1;
    CT_CHECK(write(stop, &one, sizeof one) == sizeof one, "eventfd write: %s", ct_err(errno));
    e = lthread_start(&l, &f, &x, stop, 1, CUFFD_FALLBACK_ZEROPAGE);
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
        CT_CHECK(ct_check_pattern(f.base + i * f.ps, f.ps, (size_t)i) < 0, "page %d wrong", i);
out:
    if (l.running) lthread_stop(&l, stop);
    if (stop >= 0) close(stop);
    ct_fix_fini(&f);
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

int cuffd_test_loop_eagain_retry(int kind, char *msg, size_t msglen) {
    int rc;
    struct ct_fix f;
    struct lctx x;
    struct lthread l = {0};
    struct dontneed d = {0};
    bool dstarted = false;
    int stop = -1;
    rc = ct_fix_init(&f, kind, 4, UFFD_FEATURE_EVENT_REMOVE, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    int64_t done;
    int e = cuffd_register(f.uffd, U(f.base), 4 * f.ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    e = cuffd_copy(f.uffd, U(f.base + 3 * f.ps), U(f.src + 3 * f.ps), f.ps, 0, &done);
    CT_CHECK(e == 0, "COPY page 3: %s", ct_err(e));
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    lctx_init(&x, &f, -1);
    // Queue a fault, then a REMOVE behind it: the loop reads the fault first (faults are
    // dequeued before events), its COPY meets EAGAIN, and the fault must be retried, not lost.
    struct ct_toucher t = {.addr = f.base, .count = 1};
    e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    pid_t tid = t.tid;
    CT_CHECK(ct_wait_blocked(&tid, 1, CT_WAIT_MS), "faulting thread did not block");
    d = (struct dontneed){.addr = f.base + 3 * f.ps, .len = f.ps};
    e = pthread_create(&d.th, NULL, dontneed_main, &d);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    dstarted = true;
    while (!atomic_load(&d.started)) usleep(1000);
    tid = d.tid;
    CT_CHECK(ct_wait_blocked(&tid, 1, CT_WAIT_MS), "MADV_DONTNEED did not block on its REMOVE event");
    e = lthread_start(&l, &f, &x, stop, 1, CUFFD_FALLBACK_ZEROPAGE);
    CT_CHECK(e == 0, "loop thread: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "the fault was lost: its thread is still blocked");
    CT_CHECK(ct_join(d.th, CT_WAIT_MS) == 0, "MADV_DONTNEED still blocked");
    dstarted = false;
    CT_CHECK(d.ret == 0, "madvise: %s", ct_err(d.ret));
    e = lthread_stop(&l, stop);
    CT_CHECK(e == 0, "loop did not stop: %s", ct_err(e));
    const struct cuffd_loop_stats *s = &l.st;
    CT_CHECK(s->retries >= 1, "no EAGAIN retry counted: the race was not exercised (reads %llu)",
             (unsigned long long)s->reads);
    CT_CHECK(s->events[2] == 1 && s->faults_missing == 1, "stats: %llu REMOVE events, %llu faults",
             (unsigned long long)s->events[2], (unsigned long long)s->faults_missing);
    CT_CHECK(s->ops[CUFFD_OP_COPY] == 1 + s->retries && s->bytes == f.ps && s->fallbacks == 0 && s->failures == 0,
             "stats: COPY ops %llu retries %llu bytes %llu fallbacks %llu failures %llu",
             (unsigned long long)s->ops[CUFFD_OP_COPY], (unsigned long long)s->retries,
             (unsigned long long)s->bytes, (unsigned long long)s->fallbacks, (unsigned long long)s->failures);
    CT_CHECK(ct_check_pattern(f.base, f.ps, 0) < 0, "page 0 wrong");
out:
    if (l.running) lthread_stop(&l, stop);
    if (dstarted) ct_join(d.th, 1000);
    if (stop >= 0) close(stop);
    ct_fix_fini(&f);
    return rc;
}
