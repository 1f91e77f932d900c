// Deferred resolution in the C core: OP_DEFER answers, the in-flight table (single flight),
// finishing from another thread, the loop's deadline, late finishes, cancel.
#include "ct.h"

#include <sys/eventfd.h>
#include <unistd.h>

#define U(p) ((uint64_t)(uintptr_t)(p))
#define CHUNK 4 // pages per deferred range

struct dctx {
    struct cuffd_deferred *d;
    uint64_t ps;
    char *base;
    uint64_t deadline_ns[8]; // per chunk: how long its fetch may take
    _Atomic uint64_t token[8];
    atomic_int begun[8];
    atomic_int expired, expired_errors;
};

static void ddecide(void *c, const struct uffd_msg *msgs, struct cuffd_resolution *res, size_t n) {
    struct dctx *x = c;
    for (size_t i = 0; i < n; i++) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
        uint64_t a = msgs[i].arg.pagefault.address;
        size_t chunk = (size_t)((a - U(x->base)) / (CHUNK * x->ps));
        uint64_t tok;
        int e = cuffd_deferred_begin(x->d, &msgs[i], U(x->base) + chunk * CHUNK * x->ps, CHUNK * x->ps, x->ps,
                                     cuffd_now_ns() + x->deadline_ns[chunk], &tok);
        if (e == 1) {
            atomic_store(&x->token[chunk], tok);
            atomic_fetch_add(&x->begun[chunk], 1);
        }
        res[i].op = e >= 0 ? CUFFD_OP_DEFER : CUFFD_OP_FAIL;
    }
}

static void dcomplete(void *c, const struct uffd_msg *msgs, const struct cuffd_resolution *res, size_t n) {
    struct dctx *x = c;
    (void)msgs;
    for (size_t i = 0; i < n; i++) {
        if (res[i].op == CUFFD_OP_DEFER && res[i].error == ETIMEDOUT) {
            atomic_fetch_add(&x->expired, 1);
            if (res[i].outcome != CUFFD_OUTCOME_FALLBACK) atomic_fetch_add(&x->expired_errors, 1);
        }
    }
}

struct dloop {
    pthread_t th;
    struct cuffd_loop_config cfg;
    struct cuffd_loop_stats st;
    int ret;
};

static void *dloop_main(void *a) {
    struct dloop *l = a;
    l->ret = cuffd_loop_run(&l->cfg, &l->st);
    return NULL;
}

static bool wait_stat(struct cuffd_deferred *d, size_t off, uint64_t want) {
    for (int i = 0; i < CT_WAIT_MS; i++) {
        struct cuffd_deferred_stats s;
        cuffd_deferred_get_stats(d, &s);
        if (*(uint64_t *)((char *)&s + off) >= want) return true;
        usleep(1000);
    }
    return false;
}
#define WAIT_STAT(d, field, want) wait_stat(d, offsetof(struct cuffd_deferred_stats, field), want)

static int t_deferred_loop(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct dctx x;
    struct dloop l;
    bool looping = false;
    int stop = -1;
    struct ct_toucher t[4];
    memset(t, 0, sizeof t);
    memset(&x, 0, sizeof x);
    int e = cuffd_register(f->uffd, U(f->base), 3 * CHUNK * f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    e = cuffd_deferred_create(f->uffd, 2, CUFFD_FALLBACK_ZEROPAGE, f->features, &x.d);
    CT_CHECK(e == 0, "cuffd_deferred_create: %s", ct_err(e));
    x.ps = f->ps;
    x.base = f->base;
    x.deadline_ns[0] = x.deadline_ns[2] = 10ull * 1000000000;
    x.deadline_ns[1] = 100ull * 1000000; // chunk 1 is never delivered: its deadline passes
    stop = eventfd(0, EFD_CLOEXEC);
    CT_CHECK(stop >= 0, "eventfd: %s", ct_err(errno));
    memset(&l, 0, sizeof l);
    l.cfg = (struct cuffd_loop_config){.uffd = f->uffd, .stop_fd = stop, .batch = 8, .fallback = CUFFD_FALLBACK_ZEROPAGE,
                                       .features = f->features, .decide = ddecide, .complete = dcomplete, .ctx = &x,
                                       .deferred = x.d};
    e = pthread_create(&l.th, NULL, dloop_main, &l);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    looping = true;

    // Single flight: two threads in chunk 0 wait for one fetch; one COPY wakes both.
    t[0] = (struct ct_toucher){.addr = f->base, .count = 1};
    t[1] = (struct ct_toucher){.addr = f->base + 2 * f->ps, .count = 1};
    CT_CHECK(ct_touch_start(&t[0]) == 0 && ct_touch_start(&t[1]) == 0, "pthread_create");
    CT_CHECK(WAIT_STAT(x.d, joined, 1), "the second fault did not join the fetch in flight");
    CT_CHECK(atomic_load(&x.begun[0]) == 1, "chunk 0 begun %d times", atomic_load(&x.begun[0]));
    uint64_t tok0 = atomic_load(&x.token[0]);
    struct uffd_msg first;
    struct cuffd_resolution r;
    e = cuffd_deferred_complete(x.d, tok0, U(f->src), &first, &r);
    CT_CHECK(e == CUFFD_OUTCOME_RESOLVED && r.done == (int64_t)(CHUNK * f->ps), "complete: %d done %lld", e, (long long)r.done);
    CT_CHECK(first.event == UFFD_EVENT_PAGEFAULT, "complete did not hand back the first fault");
    CT_CHECK(ct_touch_join(&t[0], CT_WAIT_MS) == 0 && ct_touch_join(&t[1], CT_WAIT_MS) == 0, "a waiter was not woken");
    for (size_t p = 0; p < CHUNK; p++) CT_CHECK(ct_check_pattern(f->base + p * f->ps, f->ps, p) < 0, "page %zu wrong", p);
    e = cuffd_deferred_complete(x.d, tok0, U(f->src), NULL, NULL);
    CT_CHECK(e == -EALREADY, "a second complete: %s, expected EALREADY", ct_err(e));

    // Deadline: chunk 1's fetch never finishes; the loop applies the fallback (zeros) and
    // reports ETIMEDOUT; the late complete is refused.
    t[2] = (struct ct_toucher){.addr = f->base + CHUNK * f->ps, .count = 1};
    CT_CHECK(ct_touch_start(&t[2]) == 0, "pthread_create");
    CT_CHECK(ct_touch_join(&t[2], CT_WAIT_MS) == 0, "the deadline did not release the thread");
    CT_CHECK(t[2].sum == 0, "the fallback should read zeros");
    CT_CHECK(WAIT_STAT(x.d, expired, 1), "no expiry counted");
    for (int i = 0; i < 1000 && !atomic_load(&x.expired); i++) usleep(1000);
    CT_CHECK(atomic_load(&x.expired) == 1 && atomic_load(&x.expired_errors) == 0, "expiry reports %d (bad %d)",
             atomic_load(&x.expired), atomic_load(&x.expired_errors));
    e = cuffd_deferred_complete(x.d, atomic_load(&x.token[1]), U(f->src), NULL, NULL);
    CT_CHECK(e == -ETIMEDOUT, "a complete after the deadline: %s, expected ETIMEDOUT", ct_err(e));

    // Cancel (the owner's stop): chunk 2 in flight is woken, its thread re-faults and stays
    // queued (no loop runs); a late complete is refused; closing the uffd releases the thread.
    t[3] = (struct ct_toucher){.addr = f->base + 2 * CHUNK * f->ps, .count = 1};
    CT_CHECK(ct_touch_start(&t[3]) == 0, "pthread_create");
    CT_CHECK(WAIT_STAT(x.d, fetches, 3), "chunk 2 was not begun");
    uint64_t one = 1;
    CT_CHECK(write(stop, &one, sizeof one) == sizeof one, "stop");
    CT_CHECK(ct_join(l.th, CT_WAIT_MS) == 0, "loop did not stop");
    looping = false;
    CT_CHECK(cuffd_deferred_cancel(x.d) == 1, "cancel should wake one range");
    e = cuffd_deferred_complete(x.d, atomic_load(&x.token[2]), U(f->src), NULL, NULL);
    CT_CHECK(e == -ECANCELED, "a complete after cancel: %s, expected ECANCELED", ct_err(e));
    uint64_t tok;
    struct uffd_msg fake = first;
    e = cuffd_deferred_begin(x.d, &fake, U(f->base), CHUNK * f->ps, f->ps, cuffd_now_ns() + 1000000000, &tok);
    CT_CHECK(e == -ESHUTDOWN, "begin after cancel: %s, expected ESHUTDOWN", ct_err(e));
    struct cuffd_deferred_stats s;
    cuffd_deferred_get_stats(x.d, &s);
    CT_CHECK(s.fetches == 3 && s.joined == 1 && s.resolved == 1 && s.bytes == CHUNK * f->ps && s.expired == 1 &&
                 s.fallbacks == 1 && s.cancelled == 1 && s.late == 3 && s.in_flight == 0,
             "stats: fetches %llu joined %llu resolved %llu bytes %llu expired %llu fallbacks %llu cancelled %llu late %llu",
             (unsigned long long)s.fetches, (unsigned long long)s.joined, (unsigned long long)s.resolved,
             (unsigned long long)s.bytes, (unsigned long long)s.expired, (unsigned long long)s.fallbacks,
             (unsigned long long)s.cancelled, (unsigned long long)s.late);
    CT_CHECK(l.st.ops[CUFFD_OP_DEFER] >= 4, "DEFER ops %llu", (unsigned long long)l.st.ops[CUFFD_OP_DEFER]);
    close(f->uffd); // releases the re-faulted thread of chunk 2 (it faults normally: zeros)
    f->uffd = -1;
    CT_CHECK(ct_touch_join(&t[3], CT_WAIT_MS) == 0, "closing the uffd did not release the cancelled thread");
out:
    if (looping) {
        uint64_t v = 1;
        if (write(stop, &v, sizeof v) == sizeof v) ct_join(l.th, 1000);
    }
    if (x.d) cuffd_deferred_destroy(x.d);
    if (stop >= 0) close(stop);
    return rc;
}

// MARK: - the table

CT_CASES(deferred) = {
    {"deferred_loop", t_deferred_loop, CT_M_ANON | CT_M_SHMEM, 0, 3 * CHUNK,
     "OP_DEFER: two faults on a range in flight wait for one fetch finished from another thread; a fetch past its deadline gets the fallback; late and second finishes are refused; cancel wakes what is in flight."},
    CT_END,
};
