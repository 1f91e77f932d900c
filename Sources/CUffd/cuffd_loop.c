// The fault loop: poll the uffd and a stop fd, read messages in batches, let a callback decide,
// resolve, report. No allocation and no locks on this path.
#include "CUffd.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

uint64_t cuffd_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

ssize_t cuffd_read_msgs(int fd, struct uffd_msg *msgs, size_t max) {
    for (;;) {
        ssize_t n = read(fd, msgs, max * sizeof(*msgs));
        if (n >= 0) return n / (ssize_t)sizeof(*msgs);
        if (errno == EINTR) continue;
        return errno == EAGAIN ? 0 : -errno;
    }
}

int cuffd_wait_readable(int fd, int timeout_ms) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    for (;;) {
        int rc = poll(&p, 1, timeout_ms);
        if (rc >= 0) return rc > 0 ? 1 : 0;
        if (errno != EINTR) return -errno;
    }
}

int cuffd_service_pipe(int fds[2], size_t bytes) {
    if (pipe2(fds, O_CLOEXEC) != 0) return -errno;
    int fl = fcntl(fds[1], F_GETFL);
    if (fl < 0 || fcntl(fds[1], F_SETFL, fl | O_NONBLOCK) != 0) {
        int e = errno;
        close(fds[0]);
        close(fds[1]);
        return -e;
    }
    // Above /proc/sys/fs/pipe-max-size this fails (EPERM without CAP_SYS_RESOURCE): the
    // default size stays, and the caller sees the capacity it got.
    if (bytes <= INT_MAX) (void)fcntl(fds[1], F_SETPIPE_SZ, (int)bytes);
    int cap = fcntl(fds[1], F_GETPIPE_SZ);
    return cap > 0 ? cap : 4096;
}

// Cached on first use by whichever reader thread gets there: relaxed atomics, since several
// threads run the loop at once (a plain static is a data race).
static uint64_t base_page(void) {
    static _Atomic uint64_t ps;
    uint64_t v = atomic_load_explicit(&ps, memory_order_relaxed);
    if (!v) {
        v = (uint64_t)sysconf(_SC_PAGESIZE);
        atomic_store_explicit(&ps, v, memory_order_relaxed);
    }
    return v;
}

// The base page holding the faulting address.
static uint64_t fault_page(const struct uffd_msg *msg) {
    return msg->arg.pagefault.address & ~(base_page() - 1);
}

// Wakes the faulting thread: it re-faults, and the fault is delivered again.
static void wake_fault(int uffd, const struct uffd_msg *msg) {
    cuffd_wake(uffd, fault_page(msg), base_page());
}

// Every filling verb's DONTWAKE is bit 0. The loop owns waking: a resolution always wakes its
// range, or a decider's DONTWAKE would leave the faulting thread asleep with nobody to wake it.
#define VERB_DONTWAKE ((uint64_t)1 << 0)
_Static_assert(UFFDIO_COPY_MODE_DONTWAKE == VERB_DONTWAKE && UFFDIO_ZEROPAGE_MODE_DONTWAKE == VERB_DONTWAKE &&
                   UFFDIO_MOVE_MODE_DONTWAKE == VERB_DONTWAKE && UFFDIO_CONTINUE_MODE_DONTWAKE == VERB_DONTWAKE &&
                   UFFDIO_POISON_MODE_DONTWAKE == VERB_DONTWAKE,
               "DONTWAKE is bit 0 of every filling verb's mode");

// Performs the op itself; returns 0 or -errno, with *done the bytes resolved.
static int perform(int uffd, const struct cuffd_resolution *r, int64_t *done) {
    *done = 0;
    uint64_t mode = r->mode & ~VERB_DONTWAKE;
    switch (r->op) {
    case CUFFD_OP_COPY: return cuffd_copy(uffd, r->dst, r->src, r->len, mode, done);
    case CUFFD_OP_ZEROPAGE: return cuffd_zeropage(uffd, r->dst, r->len, mode, done);
    case CUFFD_OP_MOVE: return cuffd_move(uffd, r->dst, r->src, r->len, mode, done);
    case CUFFD_OP_CONTINUE: return cuffd_continue(uffd, r->dst, r->len, mode, done);
    case CUFFD_OP_POISON: return cuffd_poison(uffd, r->dst, r->len, mode, done);
    case CUFFD_OP_UNPROTECT: {
        int rc = cuffd_writeprotect(uffd, r->dst, r->len, false, false);
        if (rc == 0) *done = (int64_t)r->len;
        return rc;
    }
    case CUFFD_OP_WAKE: {
        int rc = cuffd_wake(uffd, r->dst, r->len);
        if (rc == 0) *done = (int64_t)r->len;
        return rc;
    }
    case CUFFD_OP_FAIL: return -EIO;
    default: return -EINVAL;
    }
}

// Whether the decider's range is on page boundaries and contains the faulting address. Any
// other range (elsewhere, misaligned, a length that is not a page multiple) cannot release the
// faulting thread: resolving or waking it leaves that thread asleep for good.
static bool covers_fault(const struct uffd_msg *msg, const struct cuffd_resolution *r) {
    uint64_t ps = base_page();
    if (!r->len || ((r->dst | r->len) & (ps - 1))) return false;
    if (!msg) return true;
    uint64_t a = msg->arg.pagefault.address;
    return a >= r->dst && a - r->dst < r->len;
}

// The page the fallback acts on: the decider's range when it covers the fault, else the
// fault's base page.
static void fallback_range(const struct uffd_msg *msg, const struct cuffd_resolution *r,
                           uint64_t *start, uint64_t *len) {
    if (!msg || covers_fault(msg, r)) {
        *start = r->dst;
        *len = r->len;
    } else {
        *start = fault_page(msg);
        *len = base_page();
    }
}

// hugetlb ranges refuse base-page ranges (EINVAL): the fallback retries with the huge page.
static uint64_t huge_page(void) {
    static _Atomic uint64_t hps;
    uint64_t v = atomic_load_explicit(&hps, memory_order_relaxed);
    if (!v) {
        v = cuffd_hugepage_size();
        atomic_store_explicit(&hps, v, memory_order_relaxed);
    }
    return v;
}

// Zeros to COPY from where there is no zero page (hugetlb): one huge page of never-touched
// private anonymous memory, which reads as zeros without allocating. Made on first use (a
// fallback is the rare path) and kept for the process's life.
static uint64_t zero_source(uint64_t len) {
    static _Atomic(uintptr_t) zeros;
    uint64_t size = huge_page();
    if (!size || len > size) return 0;
    uintptr_t z = atomic_load(&zeros);
    if (z) return z;
    void *m = mmap(NULL, size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return 0;
    uintptr_t expected = 0;
    if (!atomic_compare_exchange_strong(&zeros, &expected, (uintptr_t)m)) {
        munmap(m, size);
        return expected;
    }
    return (uintptr_t)m;
}

// One attempt of the fallback on [start, start+len).
static int fallback_op(int uffd, uint64_t start, uint64_t len, uint64_t flags, int fallback,
                       uint64_t features) {
    int64_t done = 0;
    if (flags & UFFD_PAGEFAULT_FLAG_WP) {
        // The data is there; only the tracking is lost. Unprotect wakes the thread.
        return cuffd_writeprotect(uffd, start, len, false, false);
    }
    if (fallback == CUFFD_FALLBACK_POISON && (features & UFFD_FEATURE_POISON))
        return cuffd_poison(uffd, start, len, 0, &done);
    if (flags & UFFD_PAGEFAULT_FLAG_MINOR) return cuffd_continue(uffd, start, len, 0, &done);
    int rc = cuffd_zeropage(uffd, start, len, 0, &done);
    if (rc == -EINVAL) {
        // hugetlb has no zero page: copy zeros instead.
        uint64_t z = zero_source(len);
        if (z) rc = cuffd_copy(uffd, start, z, len, 0, &done);
    }
    return rc;
}

// Unblocks the faulting thread after a failed resolution, as the fallback says.
static int apply_fallback(int uffd, const struct uffd_msg *msg, const struct cuffd_resolution *r,
                          int fallback, uint64_t features) {
    uint64_t start, len;
    fallback_range(msg, r, &start, &len);
    uint64_t flags = msg ? msg->arg.pagefault.flags : 0;
    if (fallback == CUFFD_FALLBACK_WAKE) return cuffd_wake(uffd, start, len);
    int rc = fallback_op(uffd, start, len, flags, fallback, features);
    if (rc == -EINVAL && msg) {
        // The decider's range was refused (e.g. not huge-page aligned in a hugetlb range), or
        // the base page was: retry on the faulting base page, then on its huge page. In a
        // hugetlb range the fallback must cover the whole huge page, or the thread re-faults
        // forever.
        uint64_t ps = base_page(), hps = huge_page();
        if (len != ps || start != fault_page(msg)) {
            start = fault_page(msg);
            len = ps;
            rc = fallback_op(uffd, start, len, flags, fallback, features);
        }
        if (rc == -EINVAL && hps > len) {
            start = msg->arg.pagefault.address & ~(hps - 1);
            len = hps;
            rc = fallback_op(uffd, start, len, flags, fallback, features);
        }
    }
    // Someone else resolved the page meanwhile: that unblocks the thread as well.
    if (rc == -EEXIST) rc = cuffd_wake(uffd, start, len);
    // An event (fork, REMOVE) is changing the address space: the fault is kept and decided
    // again once it is read, as for any EAGAIN. A wake here would only make the thread
    // re-fault into the same failure, once per round, for as long as the events keep coming.
    if (rc == -EAGAIN && msg) return rc;
    if (rc < 0) {
        // Last resort: a wake. The thread re-faults and the fault is delivered again.
        cuffd_wake(uffd, start, len);
    }
    return rc;
}

// ENOENT for a range wider than the faulting page may only mean that the range crosses a VMA
// boundary (an mprotect or mmap split inside the registered range): the kernel refuses the
// whole range while the faulting page itself is fine. Calling that "gone" would wake the
// thread onto the same window forever. Retry the faulting page alone (base page; the huge
// page when hugetlb refuses that); returns the retry's 0 or -errno, its bytes added to *done,
// or the original -ENOENT when there is nothing narrower to try.
static int retry_fault_page(int uffd, const struct uffd_msg *msg, const struct cuffd_resolution *res,
                            int64_t *done) {
    if (!msg || msg->event != UFFD_EVENT_PAGEFAULT || res->op == CUFFD_OP_MOVE || !covers_fault(msg, res))
        return -ENOENT;
    uint64_t a = msg->arg.pagefault.address;
    uint64_t prior = *done > 0 ? (uint64_t)*done : 0;
    // The fault's page was placed before the ENOENT: it is resolved.
    if (a < res->dst + prior) return 0;
    uint64_t sizes[2] = {base_page(), huge_page()};
    int rc = -ENOENT;
    for (int k = 0; k < 2; k++) {
        uint64_t ps = sizes[k];
        if (!ps || (k == 1 && ps <= sizes[0])) break;
        uint64_t page = a & ~(ps - 1);
        if (page < res->dst || page + ps > res->dst + res->len) break;
        if (page == res->dst && ps == res->len) break; // what failed already
        struct cuffd_resolution one = *res;
        one.dst = page;
        one.len = ps;
        if (one.op == CUFFD_OP_COPY) one.src = res->src + (page - res->dst);
        int64_t d = 0;
        rc = perform(uffd, &one, &d);
        if (d > 0) *done += d;
        if (rc != -EINVAL) break;
    }
    return rc == -EINVAL ? -ENOENT : rc;
}

int cuffd_resolve_one(int uffd, const struct uffd_msg *msg, struct cuffd_resolution *res,
                      int fallback, uint64_t features) {
    int64_t done = 0;
    int rc = perform(uffd, res, &done);
    if (rc == -ENOENT) {
        int r1 = retry_fault_page(uffd, msg, res, &done);
        if (r1 == 0) {
            // The faulting page is in; the rest of the range is not (another VMA): wake the
            // range so threads waiting elsewhere in it re-fault and are decided again.
            cuffd_wake(uffd, res->dst, res->len);
            res->done = done;
            res->error = 0;
            res->outcome = CUFFD_OUTCOME_RESOLVED;
            return CUFFD_OUTCOME_RESOLVED;
        }
        if (r1 != -ENOENT) rc = r1;
    }
    res->done = done;
    res->error = rc < 0 ? -rc : 0;
    int outcome;
    if (rc == 0) {
        outcome = CUFFD_OUTCOME_RESOLVED;
    } else if (rc == -EEXIST) {
        // Resolved by someone else (another handler thread, a racing resolver): make sure the
        // waiter is woken, then it is done.
        cuffd_wake(uffd, res->dst + (uint64_t)done, res->len - (uint64_t)done);
        outcome = CUFFD_OUTCOME_EXISTED;
    } else if (rc == -EAGAIN) {
        return CUFFD_OUTCOME_RETRY;
    } else if (rc == -ESRCH || (rc == -ENOENT && res->op != CUFFD_OP_MOVE)) {
        // The range or the process is gone. (For MOVE, ENOENT is a source hole: a policy
        // error, which gets the fallback below.)
        if (res->len) cuffd_wake(uffd, res->dst, res->len);
        outcome = CUFFD_OUTCOME_GONE;
    } else {
        int frc = apply_fallback(uffd, msg, res, fallback, features);
        // The op failed (res->error says why) and its fallback met EAGAIN: a retry, like the
        // op's own EAGAIN, with the op's error kept so the caller can tell the two apart.
        if (frc == -EAGAIN) return CUFFD_OUTCOME_RETRY;
        outcome = frc == 0 ? CUFFD_OUTCOME_FALLBACK : CUFFD_OUTCOME_FAILED;
    }
    // Whatever the outcome, the wakes above covered the decider's range only. A range that
    // missed the faulting page would leave its thread asleep: wake it, so it re-faults (and is
    // delivered again) rather than hangs.
    if (msg && msg->event == UFFD_EVENT_PAGEFAULT && res->len) {
        uint64_t a = msg->arg.pagefault.address;
        uint64_t covered = outcome == CUFFD_OUTCOME_RESOLVED ? (uint64_t)res->done : res->len;
        if (a < res->dst || a >= res->dst + covered) wake_fault(uffd, msg);
    }
    res->outcome = (uint32_t)outcome;
    return outcome;
}

static void count_msg(struct cuffd_loop_stats *st, const struct uffd_msg *m) {
    st->messages++;
    switch (m->event) {
    case UFFD_EVENT_PAGEFAULT:
        if (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) st->faults_wp++;
        else if (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR) st->faults_minor++;
        else st->faults_missing++;
        break;
    case UFFD_EVENT_FORK: st->events[CUFFD_EVENT_SLOT_FORK]++; break;
    case UFFD_EVENT_REMAP: st->events[CUFFD_EVENT_SLOT_REMAP]++; break;
    case UFFD_EVENT_REMOVE: st->events[CUFFD_EVENT_SLOT_REMOVE]++; break;
    case UFFD_EVENT_UNMAP: st->events[CUFFD_EVENT_SLOT_UNMAP]++; break;
    default: st->events[CUFFD_EVENT_SLOT_OTHER]++; break;
    }
}

// A fault kept after EAGAIN is decided again (the event read meanwhile may have changed the
// answer). When the new decision is the one that met EAGAIN, the kernel's partial progress
// stands: go on at start+done instead of sending the done part again (which would end in EEXIST
// on the first page and leave the rest unfilled).
// Returns the bytes skipped (0: performed as decided).
static uint64_t continue_partial(struct cuffd_resolution *r, const struct cuffd_resolution *prev) {
    uint64_t done = prev->done > 0 ? (uint64_t)prev->done : 0;
    if (!done || done >= prev->len || r->op != prev->op || r->dst != prev->dst || r->len != prev->len ||
        r->src != prev->src || r->mode != prev->mode)
        return 0;
    r->dst += done;
    r->len -= done;
    if (r->op == CUFFD_OP_COPY || r->op == CUFFD_OP_MOVE) r->src += done;
    return done;
}

// The decision a continued resolution came from, with all progress so far as `done`: what the
// next round's decision is compared with.
static struct cuffd_resolution as_decided(const struct cuffd_resolution *r, uint64_t skipped) {
    struct cuffd_resolution d = *r;
    d.dst -= skipped;
    d.len += skipped;
    if (d.op == CUFFD_OP_COPY || d.op == CUFFD_OP_MOVE) d.src -= skipped;
    d.done = (int64_t)skipped + (r->done > 0 ? r->done : 0);
    return d;
}

// How long poll() may sleep: until the earliest deadline of the deferred fetches, if any.
static int poll_timeout(const struct cuffd_loop_config *cfg) {
    uint64_t dl = cuffd_deferred_next_deadline(cfg->deferred);
    if (dl == UINT64_MAX) return -1;
    uint64_t now = cuffd_now_ns();
    if (dl <= now) return 0;
    uint64_t ms = (dl - now + 999999) / 1000000;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

// Fetches past their deadline get the fallback; the owner hears of them through `complete`.
static void expire_deferred(const struct cuffd_loop_config *cfg) {
    struct uffd_msg m[8];
    struct cuffd_resolution r[8];
    size_t k;
    do {
        k = cuffd_deferred_expire(cfg->deferred, cuffd_now_ns(), m, r, 8);
        if (k && cfg->complete) cfg->complete(cfg->ctx, m, r, k);
    } while (k == 8);
}

// Waits before kept faults are retried, longer the more rounds in a row found nothing new
// (see the end of cuffd_loop_run). Sets *stopping when the stop fd fires during the wait.
static void retry_backoff(struct pollfd *pfd, nfds_t npfd, uint32_t idle_rounds, bool *stopping) {
    if (idle_rounds <= 2) {
        sched_yield();
        return;
    }
    uint32_t shift = idle_rounds - 3 < 6 ? idle_rounds - 3 : 6;
    long us = 16L << shift;
    if (us > 1000) us = 1000;
    struct timespec ts = {.tv_sec = 0, .tv_nsec = us * 1000L};
    if (ppoll(pfd, npfd, &ts, NULL) > 0 && npfd == 2 &&
        (pfd[1].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL)))
        *stopping = true;
}

// Room for one full read plus faults deferred by EAGAIN from the previous round.
#define LOOP_CAP (2 * CUFFD_MAX_BATCH)
// While stopping, the number of rounds that may still find messages before the loop gives up
// on a queue that never empties (faults arriving faster than they are drained).
#define STOP_DRAIN_ROUNDS 1024

int cuffd_loop_run(const struct cuffd_loop_config *cfg, struct cuffd_loop_stats *st) {
    struct uffd_msg msgs[LOOP_CAP];
    struct cuffd_resolution res[LOOP_CAP];
    struct cuffd_resolution kept_res[CUFFD_MAX_BATCH]; // what the kept faults met EAGAIN with
    uint64_t skipped[CUFFD_MAX_BATCH];                 // progress carried into this round's kept faults
    uint8_t retry[LOOP_CAP] = {0};
    size_t batch = cfg->batch ? cfg->batch : 1;
    if (batch > CUFFD_MAX_BATCH) batch = CUFFD_MAX_BATCH;
    struct pollfd pfd[2] = {
        {.fd = cfg->uffd, .events = POLLIN},
        {.fd = cfg->stop_fd, .events = POLLIN},
    };
    nfds_t npfd = cfg->stop_fd >= 0 ? 2 : 1;
    size_t pending = 0; // deferred faults at the front of msgs
    bool stopping = false;
    int drain_rounds = 0;
    uint32_t spins = 0;
    uint32_t idle_retries = 0; // consecutive rounds that only retried kept faults

    for (;;) {
        // Wait for work, unless retries are pending (their event is already queued).
        if (pending == 0 && !stopping) {
            if (spins < cfg->spin_polls) {
                // Busy polling skips poll(): look at the stop fd every 64 spins, or stop() waits
                // for the whole spin budget.
                if ((++spins & 63) == 0 && npfd == 2) {
                    struct pollfd sp = pfd[1];
                    if (poll(&sp, 1, 0) > 0 && (sp.revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL))) stopping = true;
                }
            } else {
                int rc = poll(pfd, npfd, cfg->deferred ? poll_timeout(cfg) : -1);
                if (rc < 0) {
                    if (errno == EINTR) continue;
                    return -errno;
                }
                if (npfd == 2 && (pfd[1].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL))) stopping = true;
                // POLLERR: the fd never had its UFFDIO_API handshake (the kernel's poll says so).
                if (pfd[0].revents & (POLLERR | POLLNVAL)) return pfd[0].revents & POLLNVAL ? -EBADF : -EINVAL;
                if ((pfd[0].revents & POLLHUP) && !(pfd[0].revents & POLLIN)) return 0;
            }
        }
        if (cfg->deferred) expire_deferred(cfg);
        size_t room = LOOP_CAP - pending;
        if (room > batch) room = batch;
        ssize_t n = room ? cuffd_read_msgs(cfg->uffd, msgs + pending, room) : 0;
        if (n < 0) return (int)n;
        if (n == 0 && pending == 0) {
            if (stopping) return 0;
            if (spins && spins < cfg->spin_polls) sched_yield();
            continue;
        }
        spins = 0;
        size_t total = pending + (size_t)n;
        // Giving up on a queue that never empties: this round is still decided and performed
        // (its events reach the decider, its faults are resolved), but a fault that has to
        // wait for an event is woken rather than kept, so it re-faults onto the queue instead
        // of sleeping until the fd is closed; then the loop returns.
        bool last_round = stopping && ++drain_rounds > STOP_DRAIN_ROUNDS;
        uint64_t now = cuffd_now_ns();
        memset(res, 0, total * sizeof(res[0]));
        for (size_t i = pending; i < total; i++) count_msg(st, &msgs[i]);
        st->reads++;
        cfg->decide(cfg->ctx, msgs, res, total);
        for (size_t i = 0; i < pending; i++) skipped[i] = continue_partial(&res[i], &kept_res[i]);

        size_t kept = 0;
        for (size_t i = 0; i < total; i++) {
            struct cuffd_resolution *r = &res[i];
            r->start_ns = now;
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT || r->op == CUFFD_OP_NONE) {
                r->end_ns = now;
                continue;
            }
            if (r->op < CUFFD_OP_COUNT) st->ops[r->op]++;
            if (r->op == CUFFD_OP_DEFER) {
                // The decider claimed the range in the in-flight table: its finisher (or the
                // deadline, or a cancel) wakes this thread.
                r->outcome = CUFFD_OUTCOME_DEFERRED;
                r->end_ns = now;
                continue;
            }
            int outcome = cuffd_resolve_one(cfg->uffd, &msgs[i], r, cfg->fallback, cfg->features);
            r->end_ns = cuffd_now_ns();
            if (outcome == CUFFD_OUTCOME_RETRY) {
                // The pending event (REMOVE, UNMAP, REMAP, FORK) must be read first; keep the
                // fault for the next round. Overflow: wake it, it re-faults.
                st->retries++;
                // The bytes done before the EAGAIN are in place: count them now.
                st->bytes += (uint64_t)(r->done > 0 ? r->done : 0);
                // In the batch as RETRY: `complete` tells the decider its decision did not
                // happen (error EAGAIN: the op met it; another error: the op failed and its
                // fallback met EAGAIN), so what it marked when deciding (a granule "moving")
                // is undone before the fault is decided again. Not a failure report: the
                // fault has not ended.
                r->outcome = CUFFD_OUTCOME_RETRY;
                if (!r->error) r->error = EAGAIN;
                if (!last_round && kept < CUFFD_MAX_BATCH) {
                    retry[i] = 1;
                    kept++;
                } else {
                    wake_fault(cfg->uffd, &msgs[i]);
                }
                continue;
            }
            st->bytes += (uint64_t)r->done;
            if (stopping) st->stop_drained++;
            switch (outcome) {
            case CUFFD_OUTCOME_EXISTED: st->existed++; break;
            case CUFFD_OUTCOME_GONE: st->gone++; break;
            case CUFFD_OUTCOME_FALLBACK: st->fallbacks++; break;
            case CUFFD_OUTCOME_FAILED: st->failures++; break;
            default: break;
            }
        }
        if (cfg->complete) cfg->complete(cfg->ctx, msgs, res, total);
        // Retries go to the front of the next round, in order.
        if (kept) {
            size_t j = 0;
            for (size_t i = 0; i < total && j < kept; i++) {
                if (!retry[i]) continue;
                retry[i] = 0;
                if (j != i) msgs[j] = msgs[i];
                kept_res[j] = as_decided(&res[i], i < pending ? skipped[i] : 0);
                j++;
            }
        }
        if (last_round) return 0;
        pending = kept;
        // Faults kept for a retry wait for the address-space change that made them meet EAGAIN.
        // Reading its event is not always enough: the changing thread (MADV_DONTNEED, fork,
        // mremap) still has to run to finish it, and until it does every retry meets EAGAIN
        // again. So a round that read nothing new backs off: a yield or two, then a wait on the
        // uffd and the stop fd that grows from 16 µs to 1 ms. New messages (the next event or
        // fault) end the wait at once; a stop is seen there too. No spinning storm of ioctls.
        idle_retries = (pending && n == 0) ? idle_retries + 1 : 0;
        if (pending) retry_backoff(pfd, npfd, idle_retries, &stopping);
    }
}
