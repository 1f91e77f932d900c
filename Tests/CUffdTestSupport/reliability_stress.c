// The stress test's locking threads and final check (after the kernel's uffd-stress): per
// page a mutex and an expected counter in side arrays, the counter itself in the registered
// memory, so every fault the handler resolves is checked by the next access to the page.
#include "reliability.h"

#include "CUffd.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define REL_MAX_THREADS 64

struct rel_stress {
    uint64_t npages, page_size;
    pthread_mutex_t *locks;
    uint64_t *expected;
    char *area; // this round's destination
    int mode;
    uint64_t seed;
    int nthreads;  // started (joined by stop)
    int planned;   // asked for (the sequential walk's spacing)
    pthread_t threads[REL_MAX_THREADS];
    atomic_int stop;
    atomic_int done[REL_MAX_THREADS];
    atomic_uint_fast64_t ops;
    atomic_int failed;
    char error[512];
};

struct rel_stress *rel_stress_create(uint64_t npages, uint64_t page_size) {
    struct rel_stress *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->npages = npages;
    s->page_size = page_size;
    s->locks = calloc(npages, sizeof *s->locks);
    s->expected = calloc(npages, sizeof *s->expected);
    if (!s->locks || !s->expected) {
        free(s->locks);
        free(s->expected);
        free(s);
        return NULL;
    }
    for (uint64_t i = 0; i < npages; i++) pthread_mutex_init(&s->locks[i], NULL);
    return s;
}

void rel_stress_destroy(struct rel_stress *s) {
    if (!s) return;
    for (uint64_t i = 0; i < s->npages; i++) pthread_mutex_destroy(&s->locks[i]);
    free(s->locks);
    free(s->expected);
    free(s);
}

void rel_stress_init_area(struct rel_stress *s, void *area) {
    for (uint64_t i = 0; i < s->npages; i++) {
        uint64_t *w = (uint64_t *)((char *)area + i * s->page_size);
        w[0] = 0;
        w[1] = i;
        s->expected[i] = 0;
    }
}

static void fail(struct rel_stress *s, const char *fmt, uint64_t a, uint64_t b, uint64_t c) {
    int expected = 0;
    if (atomic_compare_exchange_strong(&s->failed, &expected, 1))
        snprintf(s->error, sizeof s->error, fmt, (unsigned long long)a, (unsigned long long)b,
                 (unsigned long long)c);
}

struct worker_arg {
    struct rel_stress *s;
    int index;
};

static uint64_t next_rand(uint64_t *x) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static void *worker(void *p) {
    struct worker_arg *a = p;
    struct rel_stress *s = a->s;
    int idx = a->index;
    free(a);
    uint64_t rnd = s->seed * 0x9E3779B97F4A7C15ull + (s->mode == REL_STRESS_RACING ? 1 : (uint64_t)idx + 1);
    if (!rnd) rnd = 1;
    uint64_t nr = s->mode == REL_STRESS_SEQUENTIAL ? (s->npages * (uint64_t)idx) / (uint64_t)s->planned : 0;
    while (!atomic_load_explicit(&s->stop, memory_order_relaxed)) {
        if (s->mode == REL_STRESS_SEQUENTIAL) nr = (nr + 1) % s->npages;
        else nr = next_rand(&rnd) % s->npages;
        volatile uint64_t *w = (volatile uint64_t *)(s->area + nr * s->page_size);
        pthread_mutex_lock(&s->locks[nr]);
        uint64_t index = w[1]; // the first access: may fault (MISSING)
        uint64_t count = w[0];
        if (index != nr) fail(s, "page %llu holds the index %llu (counter %llu): wrong page copied", nr, index, count);
        else if (count != s->expected[nr])
            fail(s, "page %llu: counter %llu, expected %llu (a lost or doubled update)", nr, count, s->expected[nr]);
        w[0] = count + 1; // may fault (WP)
        s->expected[nr]++;
        pthread_mutex_unlock(&s->locks[nr]);
        atomic_fetch_add_explicit(&s->ops, 1, memory_order_relaxed);
        if (atomic_load_explicit(&s->failed, memory_order_relaxed)) break;
    }
    atomic_store(&s->done[idx], 1);
    return NULL;
}

int rel_stress_start(struct rel_stress *s, void *area, int nthreads, int mode, uint64_t seed) {
    if (nthreads < 1 || nthreads > REL_MAX_THREADS) return -EINVAL;
    s->area = area;
    s->mode = mode;
    s->seed = seed;
    s->nthreads = 0;
    s->planned = nthreads;
    atomic_store(&s->stop, 0);
    for (int i = 0; i < nthreads; i++) {
        struct worker_arg *a = malloc(sizeof *a);
        if (!a) return -ENOMEM;
        a->s = s;
        a->index = i;
        atomic_store(&s->done[i], 0);
        int rc = pthread_create(&s->threads[i], NULL, worker, a);
        if (rc) {
            free(a);
            return -rc;
        }
        s->nthreads = i + 1;
    }
    return 0;
}

int rel_stress_stop(struct rel_stress *s, int timeout_ms) {
    atomic_store(&s->stop, 1);
    int rc = 0;
    struct timespec dl = cuffd_deadline_after_ms((uint32_t)timeout_ms);
    for (int i = 0; i < s->nthreads; i++) {
        if (pthread_timedjoin_np(s->threads[i], NULL, &dl) != 0) {
            fail(s, "locking thread %llu of %llu did not finish within %llu ms (blocked on a fault)",
                 (uint64_t)i, (uint64_t)s->nthreads, (uint64_t)timeout_ms);
            rc = -ETIMEDOUT;
        }
    }
    if (rc == 0) s->nthreads = 0;
    return rc;
}

uint64_t rel_stress_ops(const struct rel_stress *s) { return atomic_load(&((struct rel_stress *)s)->ops); }

const char *rel_stress_error(const struct rel_stress *s) { return s->error; }

int rel_stress_verify(struct rel_stress *s, const void *area) {
    uint64_t sum = 0;
    for (uint64_t i = 0; i < s->npages; i++) {
        const uint64_t *w = (const uint64_t *)((const char *)area + i * s->page_size);
        if (w[1] != i) {
            fail(s, "final check: page %llu holds the index %llu (counter %llu)", i, w[1], w[0]);
            return -1;
        }
        if (w[0] != s->expected[i]) {
            fail(s, "final check: page %llu counter %llu, expected %llu", i, w[0], s->expected[i]);
            return -1;
        }
        sum += w[0];
    }
    uint64_t ops = rel_stress_ops(s);
    if (sum != ops) {
        fail(s, "final check: counters sum to %llu but %llu increments were done (%llu pages)", sum, ops, s->npages);
        return -1;
    }
    return atomic_load(&s->failed) ? -1 : 0;
}

// MARK: - blocking-read resolvers (uffd-stress's read mode)

struct rel_resolvers {
    int uffd, n;
    char *dst;
    const char *src;
    uint64_t len, ps;
    bool wp;
    pthread_t threads[REL_MAX_THREADS];
    atomic_int stop;
    atomic_uint_fast64_t faults, wp_faults, existed, errors;
    atomic_int first_error;
};

// The signal that interrupts a resolver's read(2) (a handler without SA_RESTART: EINTR).
#define REL_RESOLVER_WAKE SIGUSR2
static void on_resolver_wake(int sig) { (void)sig; }

static void resolve_one(struct rel_resolvers *r, const struct uffd_msg *m) {
    uint64_t a = m->arg.pagefault.address & ~(r->ps - 1), base = (uint64_t)(uintptr_t)r->dst;
    int e;
    if (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) {
        atomic_fetch_add(&r->wp_faults, 1);
        e = cuffd_writeprotect(r->uffd, a, r->ps, false, false);
    } else if (a < base || a >= base + r->len) {
        e = -EFAULT; // not ours: cannot happen with one registered area
    } else {
        atomic_fetch_add(&r->faults, 1);
        int64_t done = 0;
        e = cuffd_copy(r->uffd, a, (uint64_t)(uintptr_t)(r->src + (a - base)), r->ps,
                       r->wp ? UFFDIO_COPY_MODE_WP : 0, &done);
        if (e == -EEXIST) {
            atomic_fetch_add(&r->existed, 1);
            e = cuffd_wake(r->uffd, a, r->ps);
        }
    }
    if (e < 0 && atomic_fetch_add(&r->errors, 1) == 0) atomic_store(&r->first_error, e);
}

static void *resolver_main(void *arg) {
    struct rel_resolvers *r = arg;
    while (!atomic_load(&r->stop)) {
        struct uffd_msg m;
        // Blocks in read(2); rel_resolvers_stop interrupts it with REL_RESOLVER_WAKE (EINTR).
        ssize_t n = read(r->uffd, &m, sizeof m);
        if (n != (ssize_t)sizeof m) {
            if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
            if (atomic_fetch_add(&r->errors, 1) == 0) atomic_store(&r->first_error, n < 0 ? -errno : -EIO);
            return NULL;
        }
        if (m.event == UFFD_EVENT_PAGEFAULT) resolve_one(r, &m);
    }
    return NULL;
}

struct rel_resolvers *rel_resolvers_start(int uffd, int n, void *dst, const void *src, uint64_t len,
                                          uint64_t page_size, bool wp) {
    if (n < 1 || n > REL_MAX_THREADS) return NULL;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_resolver_wake; // no SA_RESTART: the blocked read(2) returns EINTR
    sigemptyset(&sa.sa_mask);
    if (sigaction(REL_RESOLVER_WAKE, &sa, NULL) < 0) return NULL;
    struct rel_resolvers *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    *r = (struct rel_resolvers){.uffd = uffd, .dst = dst, .src = src, .len = len, .ps = page_size, .wp = wp};
    for (int i = 0; i < n; i++) {
        if (pthread_create(&r->threads[i], NULL, resolver_main, r) != 0) break;
        r->n++;
    }
    if (r->n == 0) {
        free(r);
        return NULL;
    }
    return r;
}

int rel_resolvers_stop(struct rel_resolvers *r, struct rel_resolver_counts *out) {
    int rc = 0;
    atomic_store(&r->stop, 1);
    // A wake-up can land just before a thread enters read(2): keep waking until it is joined.
    for (int i = 0; i < r->n; i++) {
        int e = -ETIMEDOUT;
        for (int tries = 0; tries < 1000 && e == -ETIMEDOUT; tries++) {
            pthread_kill(r->threads[i], REL_RESOLVER_WAKE);
            e = cuffd_join_within(r->threads[i], 10);
        }
        if (e != 0) rc = -ETIMEDOUT;
    }
    if (out) {
        out->faults = atomic_load(&r->faults);
        out->wp_faults = atomic_load(&r->wp_faults);
        out->existed = atomic_load(&r->existed);
        out->errors = atomic_load(&r->errors);
        out->first_error = atomic_load(&r->first_error);
        out->threads = r->n;
    }
    if (rc == 0) free(r); // a thread that did not end may still use it
    return rc;
}
