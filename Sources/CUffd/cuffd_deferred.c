// Deferred resolution: the in-flight table (single flight per range), finished from any thread
// with the fault loop's outcome model. See "Deferred resolution" in CUffd.h.
#include "CUffd.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum { E_FREE = 0, E_IN_FLIGHT, E_BUSY };

struct entry {
    uint64_t dst, len, deadline_ns, start_ns;
    uint64_t page;         // page size of the range's memory: what an EEXIST skips
    uint32_t gen;          // bumped when the entry is freed: tokens of earlier fetches go stale
    uint32_t state;
    uint32_t ended_gen;    // the generation that ended last, and why (errno), for late finishes
    int32_t ended_why;
    int32_t busy_why;      // while BUSY: ETIMEDOUT when expiring, EALREADY when being finished
    uint32_t late_joins;   // faults that joined while it was being finished
    uint32_t waiters;
    struct uffd_msg msg;   // the first fault: its flags choose the fallback's kind
    struct cuffd_prefetch_result *slot; // a prefetch claim's result; NULL for a fault's fetch
};

struct cuffd_deferred {
    pthread_mutex_t mu;
    pthread_cond_t idle;   // broadcast when a BUSY entry is done (cancel waits for them)
    int uffd;
    int fallback;
    uint64_t features;
    uint32_t cap, nactive, nfree, nbusy;
    atomic_bool closed;
    _Atomic uint64_t next_deadline;
    struct cuffd_deferred_stats st;
    struct entry *e;
    uint32_t *active;      // indices in flight or busy (dense: a scan touches only these)
    uint32_t *freelist;
};

// A prefetch claim (cuffd_deferred_claim) has a result slot and no fault of its own (its msg
// stays zeroed); a fault's fetch has no slot. finish() tells them apart by it.
static bool is_prefetch(const struct entry *x) { return x->slot != NULL; }

static uint64_t token_of(const struct cuffd_deferred *d, const struct entry *x) {
    return ((uint64_t)x->gen << 32) | (uint64_t)(x - d->e);
}

int cuffd_deferred_create(int uffd, uint32_t capacity, int fallback, uint64_t features,
                          struct cuffd_deferred **out) {
    if (!out || capacity == 0) return -EINVAL;
    struct cuffd_deferred *d = calloc(1, sizeof *d);
    if (!d) return -ENOMEM;
    d->e = calloc(capacity, sizeof *d->e);
    d->active = calloc(capacity, sizeof *d->active);
    d->freelist = calloc(capacity, sizeof *d->freelist);
    if (!d->e || !d->active || !d->freelist) {
        free(d->e), free(d->active), free(d->freelist), free(d);
        return -ENOMEM;
    }
    // Its own descriptor: finishing may happen after the loop's threads closed theirs.
    d->uffd = fcntl(uffd, F_DUPFD_CLOEXEC, 0);
    if (d->uffd < 0) {
        int e = -errno;
        free(d->e), free(d->active), free(d->freelist), free(d);
        return e;
    }
    pthread_mutex_init(&d->mu, NULL);
    pthread_cond_init(&d->idle, NULL);
    d->cap = capacity;
    d->fallback = fallback;
    d->features = features;
    for (uint32_t i = 0; i < capacity; i++) d->freelist[i] = capacity - 1 - i;
    d->nfree = capacity;
    atomic_store(&d->next_deadline, UINT64_MAX);
    *out = d;
    return 0;
}

void cuffd_deferred_destroy(struct cuffd_deferred *d) {
    if (!d) return;
    cuffd_deferred_cancel(d);
    pthread_mutex_destroy(&d->mu);
    pthread_cond_destroy(&d->idle);
    free(d->e), free(d->active), free(d->freelist), free(d);
}

// With mu held: the earliest deadline of the entries in flight.
static void recompute_deadline(struct cuffd_deferred *d) {
    uint64_t m = UINT64_MAX;
    for (uint32_t i = 0; i < d->nactive; i++) {
        struct entry *x = &d->e[d->active[i]];
        if (x->state == E_IN_FLIGHT && x->deadline_ns < m) m = x->deadline_ns;
    }
    atomic_store_explicit(&d->next_deadline, m, memory_order_relaxed);
}

// Takes a free slot (caller holds mu and has checked nfree) and makes it an in-flight entry:
// a fault's (msg set, its faulting thread is the one waiter) or a prefetch claim's (slot set).
static struct entry *take_entry(struct cuffd_deferred *d, uint64_t dst, uint64_t len, uint64_t ps,
                                uint64_t deadline_ns, const struct uffd_msg *msg,
                                struct cuffd_prefetch_result *slot) {
    uint32_t idx = d->freelist[--d->nfree];
    struct entry *x = &d->e[idx];
    x->dst = dst;
    x->len = len;
    x->deadline_ns = deadline_ns;
    x->page = ps;
    x->start_ns = cuffd_now_ns();
    x->state = E_IN_FLIGHT;
    x->late_joins = 0;
    if (msg) {
        x->waiters = 1;
        x->msg = *msg;
    } else {
        x->waiters = 0;
        memset(&x->msg, 0, sizeof x->msg);
    }
    x->slot = slot;
    d->active[d->nactive++] = idx;
    return x;
}

int cuffd_deferred_begin(struct cuffd_deferred *d, const struct uffd_msg *msg, uint64_t dst,
                         uint64_t len, uint64_t page_size, uint64_t deadline_ns, uint64_t *token) {
    if (!d || !msg || !token) return -EINVAL;
    uint64_t ps = page_size ? page_size : cuffd_page_size();
    if (ps & (ps - 1)) return -EINVAL;
    uint64_t a = msg->arg.pagefault.address;
    if (!len || ((dst | len) & (ps - 1)) || a < dst || a - dst >= len) return -EINVAL;
    pthread_mutex_lock(&d->mu);
    int rc;
    if (atomic_load_explicit(&d->closed, memory_order_relaxed)) {
        rc = -ESHUTDOWN;
        goto out;
    }
    for (uint32_t i = 0; i < d->nactive; i++) {
        struct entry *x = &d->e[d->active[i]];
        if (a >= x->dst && a - x->dst < x->len) {
            x->waiters++;
            // Being finished now: its wakes may already be behind us; the finisher wakes the
            // range once more after freeing it.
            if (x->state == E_BUSY) x->late_joins++;
            d->st.joined++;
            *token = token_of(d, x);
            rc = 0;
            goto out;
        }
    }
    if (!d->nfree) {
        d->st.full++;
        rc = -ENOSPC;
        goto out;
    }
    struct entry *x = take_entry(d, dst, len, ps, deadline_ns, msg, NULL);
    if (deadline_ns < atomic_load_explicit(&d->next_deadline, memory_order_relaxed))
        atomic_store_explicit(&d->next_deadline, deadline_ns, memory_order_relaxed);
    d->st.fetches++;
    *token = token_of(d, x);
    rc = 1;
out:
    pthread_mutex_unlock(&d->mu);
    return rc;
}

// With mu held: the entry of a token that may be finished now, or NULL with *why.
static struct entry *claim(struct cuffd_deferred *d, uint64_t token, int *why) {
    uint32_t idx = (uint32_t)token, gen = (uint32_t)(token >> 32);
    if (idx >= d->cap) {
        *why = ESTALE;
        return NULL;
    }
    struct entry *x = &d->e[idx];
    if (x->gen != gen || x->state != E_IN_FLIGHT) {
        *why = x->gen == gen + 1 && x->ended_gen == gen ? x->ended_why : ESTALE;
        if (x->gen == gen && x->state == E_BUSY) *why = x->busy_why;
        return NULL;
    }
    if (atomic_load_explicit(&d->closed, memory_order_relaxed)) {
        *why = ECANCELED;
        return NULL;
    }
    x->state = E_BUSY;
    x->busy_why = EALREADY;
    d->nbusy++;
    return x;
}

// With mu held: frees a BUSY entry; returns whether faults joined while it was busy.
static bool release(struct cuffd_deferred *d, struct entry *x, int why) {
    uint32_t idx = (uint32_t)(x - d->e);
    for (uint32_t i = 0; i < d->nactive; i++) {
        if (d->active[i] == idx) {
            d->active[i] = d->active[--d->nactive];
            break;
        }
    }
    bool late = x->late_joins != 0;
    x->ended_gen = x->gen;
    x->ended_why = why;
    x->gen++;
    x->state = E_FREE;
    d->freelist[d->nfree++] = idx;
    d->nbusy--;
    recompute_deadline(d);
    pthread_cond_broadcast(&d->idle);
    return late;
}

static void count(struct cuffd_deferred *d, int outcome, const struct cuffd_resolution *r) {
    switch (outcome) {
    case CUFFD_OUTCOME_RESOLVED: d->st.resolved++; break;
    case CUFFD_OUTCOME_EXISTED: d->st.existed++; break;
    case CUFFD_OUTCOME_GONE: d->st.gone++; break;
    case CUFFD_OUTCOME_FALLBACK: d->st.fallbacks++; break;
    case CUFFD_OUTCOME_FAILED: d->st.failures++; break;
    default: break;
    }
    if (r->op == CUFFD_OP_COPY && r->done > 0) d->st.bytes += (uint64_t)r->done;
}

// Performs `r` for a claimed entry with the loop's outcome model. EEXIST on a COPY: someone
// filled that page; keep it and go on with the rest (copying the whole range again on every
// re-fault would meet the same page first, forever). EAGAIN with no progress means an event is
// unread: a reader drains it; wait and go on from where it stopped until the deadline or a
// cancel, then wake the range (its threads re-fault and are asked again).
static int perform_claimed(struct cuffd_deferred *d, struct entry *x, struct cuffd_resolution *r,
                           uint64_t *retries) {
    const uint64_t dst = r->dst, len = r->len, src = r->src;
    uint64_t pos = 0;
    int64_t copied = 0;
    bool existed = false;
    int outcome;
    for (unsigned spin = 0;;) {
        r->dst = dst + pos;
        r->len = len - pos;
        if (r->op == CUFFD_OP_COPY) r->src = src + pos;
        outcome = cuffd_resolve_one(d->uffd, &x->msg, r, d->fallback, d->features);
        if (r->done > 0) {
            pos += (uint64_t)r->done;
            copied += r->done;
        }
        if (outcome == CUFFD_OUTCOME_EXISTED && r->op == CUFFD_OP_COPY) {
            existed = true;
            pos += x->page;
            if (pos < len) continue;
            outcome = CUFFD_OUTCOME_RESOLVED;
        }
        if (outcome != CUFFD_OUTCOME_RETRY) break;
        if (spin == 0) (*retries)++; // one wait, however many polls it takes
        if (atomic_load_explicit(&d->closed, memory_order_relaxed) || cuffd_now_ns() >= x->deadline_ns) {
            cuffd_wake(d->uffd, dst, len);
            r->error = EAGAIN;
            outcome = CUFFD_OUTCOME_FAILED;
            break;
        }
        if (spin++ < 64) sched_yield();
        else usleep(100);
    }
    r->dst = dst, r->len = len, r->src = src, r->done = copied;
    if (existed && outcome == CUFFD_OUTCOME_RESOLVED) {
        outcome = CUFFD_OUTCOME_EXISTED;
        r->error = EEXIST;
    }
    return outcome;
}

static int finish_prefetch(struct cuffd_deferred *d, struct entry *x, uint32_t op, uint64_t src, int error,
                           struct uffd_msg *msg_out, struct cuffd_resolution *res_out);

static int finish(struct cuffd_deferred *d, uint64_t token, uint32_t op, uint64_t src, int error,
                  struct uffd_msg *msg_out, struct cuffd_resolution *res_out) {
    if (!d) return -EINVAL;
    pthread_mutex_lock(&d->mu);
    int why = 0;
    struct entry *x = claim(d, token, &why);
    if (!x) d->st.late++;
    pthread_mutex_unlock(&d->mu);
    if (!x) return -why;
    if (is_prefetch(x)) return finish_prefetch(d, x, op, src, error, msg_out, res_out);
    struct cuffd_resolution r = {.op = op, .dst = x->dst, .len = x->len, .src = src, .start_ns = x->start_ns};
    uint64_t retries = 0;
    int outcome = perform_claimed(d, x, &r, &retries);
    if (op == CUFFD_OP_FAIL) r.error = error;
    r.end_ns = cuffd_now_ns();
    r.outcome = (uint32_t)outcome;
    if (msg_out) *msg_out = x->msg;
    uint64_t dst = x->dst, len = x->len;
    pthread_mutex_lock(&d->mu);
    count(d, outcome, &r);
    d->st.retries += retries;
    bool late = release(d, x, EALREADY);
    pthread_mutex_unlock(&d->mu);
    if (late) cuffd_wake(d->uffd, dst, len);
    if (res_out) *res_out = r;
    return outcome;
}

int cuffd_deferred_complete(struct cuffd_deferred *d, uint64_t token, uint64_t src,
                            struct uffd_msg *msg, struct cuffd_resolution *res) {
    if (!src) return -EINVAL;
    return finish(d, token, CUFFD_OP_COPY, src, 0, msg, res);
}

int cuffd_deferred_fail(struct cuffd_deferred *d, uint64_t token, int error,
                        struct uffd_msg *msg, struct cuffd_resolution *res) {
    return finish(d, token, CUFFD_OP_FAIL, 0, error > 0 ? error : EIO, msg, res);
}

uint64_t cuffd_deferred_next_deadline(struct cuffd_deferred *d) {
    return d ? atomic_load_explicit(&d->next_deadline, memory_order_relaxed) : UINT64_MAX;
}

size_t cuffd_deferred_expire(struct cuffd_deferred *d, uint64_t now_ns, struct uffd_msg *msgs,
                             struct cuffd_resolution *res, size_t n) {
    if (!d || now_ns < cuffd_deferred_next_deadline(d)) return 0;
    struct entry *due[64];
    if (n > 64) n = 64;
    size_t k = 0;
    pthread_mutex_lock(&d->mu);
    if (!atomic_load_explicit(&d->closed, memory_order_relaxed)) {
        for (uint32_t i = 0; i < d->nactive && k < n; i++) {
            struct entry *x = &d->e[d->active[i]];
            if (x->state != E_IN_FLIGHT || x->deadline_ns > now_ns) continue;
            x->state = E_BUSY;
            x->busy_why = ETIMEDOUT;
            d->nbusy++;
            due[k++] = x;
        }
        recompute_deadline(d);
    }
    pthread_mutex_unlock(&d->mu);
    for (size_t i = 0; i < k; i++) {
        struct entry *x = due[i];
        struct cuffd_resolution r = {.op = CUFFD_OP_FAIL, .dst = x->dst, .len = x->len, .start_ns = x->start_ns};
        int outcome = cuffd_resolve_one(d->uffd, &x->msg, &r, d->fallback, d->features);
        if (outcome == CUFFD_OUTCOME_RETRY) { // the fallback met EAGAIN: a wake still releases the threads
            cuffd_wake(d->uffd, x->dst, x->len);
            outcome = CUFFD_OUTCOME_FAILED;
        }
        r.op = CUFFD_OP_DEFER;
        r.error = ETIMEDOUT;
        r.outcome = (uint32_t)outcome;
        r.end_ns = cuffd_now_ns();
        if (msgs) msgs[i] = x->msg;
        if (res) res[i] = r;
        uint64_t dst = x->dst, len = x->len;
        pthread_mutex_lock(&d->mu);
        count(d, outcome, &r);
        d->st.expired++;
        bool late = release(d, x, ETIMEDOUT);
        pthread_mutex_unlock(&d->mu);
        if (late) cuffd_wake(d->uffd, dst, len);
    }
    return k;
}

size_t cuffd_deferred_cancel(struct cuffd_deferred *d) {
    if (!d) return 0;
    pthread_mutex_lock(&d->mu);
    atomic_store(&d->closed, true);
    // Finishes in progress end first (their EAGAIN waits see `closed` and give up).
    while (d->nbusy) pthread_cond_wait(&d->idle, &d->mu);
    size_t n = 0;
    while (d->nactive) {
        struct entry *x = &d->e[d->active[0]];
        // Under the lock: this is the stop path, and no finish can run any more.
        if (d->uffd >= 0) cuffd_wake(d->uffd, x->dst, x->len);
        d->st.cancelled++;
        x->state = E_BUSY;
        d->nbusy++;
        release(d, x, ECANCELED);
        n++;
    }
    if (d->uffd >= 0) close(d->uffd);
    d->uffd = -1;
    pthread_mutex_unlock(&d->mu);
    return n;
}

void cuffd_deferred_get_stats(struct cuffd_deferred *d, struct cuffd_deferred_stats *out) {
    if (!d || !out) return;
    pthread_mutex_lock(&d->mu);
    *out = d->st;
    out->in_flight = d->nactive;
    pthread_mutex_unlock(&d->mu);
}

// MARK: - Prefetch claims (see "Prefetch through the table" in CUffd.h)

int cuffd_deferred_claim(struct cuffd_deferred *d, uint64_t dst, uint64_t len, uint64_t page_size,
                         uint32_t keep_free, struct cuffd_prefetch_result *slot, uint64_t *token) {
    if (!d || !token || !slot) return -EINVAL;
    uint64_t ps = page_size ? page_size : cuffd_page_size();
    if (ps & (ps - 1)) return -EINVAL;
    if (!len || ((dst | len) & (ps - 1)) || dst + len < dst) return -EINVAL;
    memset(slot, 0, sizeof *slot);
    pthread_mutex_lock(&d->mu);
    int rc;
    if (atomic_load_explicit(&d->closed, memory_order_relaxed)) {
        rc = -ESHUTDOWN;
        goto out;
    }
    for (uint32_t i = 0; i < d->nactive; i++) {
        struct entry *x = &d->e[d->active[i]];
        if (x->dst < dst + len && dst < x->dst + x->len) {
            rc = 0; // a fault's fetch (or another claim) has it: it wakes its own waiters
            goto out;
        }
    }
    // Faults come first: a prefetch never takes the slots they may need.
    if (d->nfree <= keep_free) {
        rc = -ENOSPC;
        goto out;
    }
    // The table's deadline applies the fallback, which is for faults; a claim is abandoned by
    // its owner instead (cuffd_deferred_abandon), so the loop never expires it.
    struct entry *x = take_entry(d, dst, len, ps, UINT64_MAX, NULL, slot);
    *token = token_of(d, x);
    rc = 1;
out:
    pthread_mutex_unlock(&d->mu);
    return rc;
}

// Installs a claim's bytes (op COPY) or drops it (op FAIL), never with the fallback: waiting
// faults are woken (by the COPY, or by a WAKE over the range) and re-fault when their page is
// still missing, to be decided as any fault is. Returns RESOLVED/EXISTED/GONE, or -ECANCELED
// when the claim was dropped or its bytes could not be placed (the slot says why).
static int finish_prefetch(struct cuffd_deferred *d, struct entry *x, uint32_t op, uint64_t src, int error,
                           struct uffd_msg *msg_out, struct cuffd_resolution *res_out) {
    const uint64_t dst = x->dst, len = x->len, ps = x->page;
    uint64_t pos = 0, existed = 0;
    int64_t copied = 0;
    int outcome = CUFFD_OUTCOME_RESOLVED, err = 0;
    if (op != CUFFD_OP_COPY) {
        err = error > 0 ? error : EIO;
        outcome = -ECANCELED;
    }
    const uint64_t give_up = cuffd_now_ns() + 1000000000ull; // EAGAIN for 1 s: drop it
    for (unsigned spin = 0; outcome == CUFFD_OUTCOME_RESOLVED && pos < len;) {
        int64_t done = 0;
        int rc = cuffd_copy(d->uffd, dst + pos, src + pos, len - pos, 0, &done);
        if (done > 0) {
            pos += (uint64_t)done;
            copied += done;
        }
        if (rc == 0) break;
        switch (-rc) {
        case EEXIST: // a fault (or the filler) got there first: keep it, go on after it
            existed++;
            pos += ps;
            break;
        case EAGAIN:
            if (atomic_load_explicit(&d->closed, memory_order_relaxed) || cuffd_now_ns() >= give_up) {
                err = EAGAIN;
                outcome = -ECANCELED;
            } else if (spin++ < 64) {
                sched_yield();
            } else {
                usleep(100);
            }
            break;
        case ENOENT:
        case ESRCH:
            err = -rc;
            outcome = CUFFD_OUTCOME_GONE;
            break;
        default:
            err = -rc;
            outcome = -ECANCELED;
            break;
        }
    }
    if (outcome == CUFFD_OUTCOME_RESOLVED && existed) outcome = CUFFD_OUTCOME_EXISTED;
    // Pages not copied by this call have threads that the COPY did not wake.
    if (outcome != CUFFD_OUTCOME_RESOLVED && d->uffd >= 0) cuffd_wake(d->uffd, dst, len);
    struct cuffd_resolution r = {.op = op, .dst = dst, .len = len, .src = src, .start_ns = x->start_ns,
                                 .done = copied, .error = err, .end_ns = cuffd_now_ns()};
    r.outcome = outcome > 0 ? (uint32_t)outcome : CUFFD_OUTCOME_NONE;
    if (msg_out) memset(msg_out, 0, sizeof *msg_out);
    pthread_mutex_lock(&d->mu);
    struct cuffd_prefetch_result *s = x->slot;
    s->copied = copied;
    s->existed_pages = existed;
    s->joined = x->waiters;
    s->error = err;
    s->outcome = outcome > 0 ? outcome : CUFFD_OUTCOME_FAILED;
    s->end_ns = r.end_ns;
    s->done = 1;
    x->slot = NULL;
    bool late = release(d, x, op == CUFFD_OP_COPY ? EALREADY : ECANCELED);
    pthread_mutex_unlock(&d->mu);
    if (late) cuffd_wake(d->uffd, dst, len);
    if (res_out) *res_out = r;
    return outcome;
}

int cuffd_deferred_abandon(struct cuffd_deferred *d, uint64_t token, int error) {
    if (!d) return -EINVAL;
    uint32_t idx = (uint32_t)token, gen = (uint32_t)(token >> 32);
    pthread_mutex_lock(&d->mu);
    // Being delivered right now: let that finish (its slot is written before it is freed).
    while (idx < d->cap && d->e[idx].gen == gen && d->e[idx].state == E_BUSY)
        pthread_cond_wait(&d->idle, &d->mu);
    int why = 0;
    struct entry *x = claim(d, token, &why);
    pthread_mutex_unlock(&d->mu);
    if (!x) return -why;
    if (!is_prefetch(x)) { // not a claim: the fault's fetch keeps its own outcome model
        pthread_mutex_lock(&d->mu);
        x->state = E_IN_FLIGHT;
        d->nbusy--;
        pthread_cond_broadcast(&d->idle);
        pthread_mutex_unlock(&d->mu);
        return -EINVAL;
    }
    finish_prefetch(d, x, CUFFD_OP_FAIL, 0, error, NULL, NULL);
    return 0;
}

int cuffd_deferred_claims_wait(struct cuffd_deferred *d, uint32_t below, uint64_t timeout_ns) {
    if (!d) return -EINVAL;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until); // the table's condition variable keeps the default clock
    uint64_t ns = (uint64_t)until.tv_nsec + timeout_ns;
    until.tv_sec += (time_t)(ns / 1000000000ull);
    until.tv_nsec = (long)(ns % 1000000000ull);
    pthread_mutex_lock(&d->mu);
    int n;
    for (;;) {
        if (atomic_load_explicit(&d->closed, memory_order_relaxed)) {
            n = -ESHUTDOWN;
            break;
        }
        n = 0;
        for (uint32_t i = 0; i < d->nactive; i++)
            if (is_prefetch(&d->e[d->active[i]])) n++;
        if ((uint32_t)n < below) break;
        if (pthread_cond_timedwait(&d->idle, &d->mu, &until) == ETIMEDOUT) break;
    }
    pthread_mutex_unlock(&d->mu);
    return n;
}

int cuffd_deferred_claim_result(struct cuffd_deferred *d, const struct cuffd_prefetch_result *slot,
                                struct cuffd_prefetch_result *out) {
    if (!d || !slot || !out) return -EINVAL;
    pthread_mutex_lock(&d->mu);
    *out = *slot;
    pthread_mutex_unlock(&d->mu);
    return out->done;
}
