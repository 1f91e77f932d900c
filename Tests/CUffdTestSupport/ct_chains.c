// Whole scenarios across processes, as the kernel's sigbus / events tests walk them: SIGBUS mode
// in this process and in a child forked under EVENT_FORK, and a child that faults, mremaps and
// releases its memory while a monitor follows FORK -> faults -> REMAP -> faults -> REMOVE.
#include "ct.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define U(p) ((uint64_t)(uintptr_t)(p))

// Waits up to timeout_ms for pid; 0 with *status, or -ETIMEDOUT (then it is killed and reaped).
static int wait_child(pid_t pid, int timeout_ms, int *status) {
    for (int ms = 0; ms < timeout_ms; ms += 2) {
        pid_t w = waitpid(pid, status, WNOHANG);
        if (w == pid) return 0;
        if (w < 0 && errno != EINTR) return -errno;
        usleep(2000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, status, 0);
    return -ETIMEDOUT;
}

// MARK: - SIGBUS mode

// Every page: a read raises SIGBUS at that page and queues nothing; COPY (protected with wp)
// fills it; with wp a write then raises SIGBUS too, until unprotected. Then released pages raise
// SIGBUS again, and a child forked under EVENT_FORK gets SIGBUS on every page while neither
// uffd receives a fault message.
static int sigbus(struct ct_fix *f, bool wp, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct ct_fork_reader r = {.uffd = f->uffd, .got = -1};
    bool reading = false;
    int child_uffd = -1;
    pid_t pid = -1;
    struct uffd_msg m;
    uint64_t mode = UFFDIO_REGISTER_MODE_MISSING | (wp ? UFFDIO_REGISTER_MODE_WP : 0);
    int e = cuffd_register(f->uffd, U(f->base), f->npages * f->ps, mode, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    for (size_t i = 0; i < f->npages; i++) {
        char *p = f->base + i * f->ps;
        void *fa = NULL;
        uint8_t v = 0;
        CT_CHECK(ct_touch_catch(p + 7, 0, 0, &v, &fa) == 1, "page %zu: a read of a missing page did not raise SIGBUS", i);
        CT_CHECK((char *)fa >= p && (char *)fa < p + f->ps, "page %zu: SIGBUS at %p, outside the page", i, fa);
        int64_t done = 0;
        e = cuffd_copy(f->uffd, U(p), U(f->src + i * f->ps), f->ps, wp ? UFFDIO_COPY_MODE_WP : 0, &done);
        CT_CHECK(e == 0, "page %zu: COPY: %s", i, ct_err(e));
        CT_CHECK(ct_touch_catch(p + 7, 0, 0, &v, NULL) == 0 && v == ct_pat(i, 7), "page %zu: read after COPY: 0x%x", i, v);
        if (wp) {
            CT_CHECK(ct_touch_catch(p + 7, 1, v, NULL, &fa) == 1, "page %zu: a write to a protected page did not raise SIGBUS", i);
            e = cuffd_writeprotect(f->uffd, U(p), f->ps, false, false);
            CT_CHECK(e == 0, "page %zu: unprotect: %s", i, ct_err(e));
            CT_CHECK(ct_touch_catch(p + 7, 1, v, NULL, &fa) == 0, "page %zu: write after unprotect raised SIGBUS", i);
        }
    }
    CT_CHECK(ct_read_msg(f->uffd, &m, 0) == 0, "SIGBUS mode queued a message (event 0x%x)", m.event);

    e = ct_release(f, 0, f->npages);
    CT_CHECK(e == 0, "release: %s", ct_err(e));
    CT_CHECK(ct_touch_catch(f->base + f->ps + 1, 0, 0, NULL, NULL) == 1, "a released page did not raise SIGBUS again");

    int e2 = pthread_create(&r.th, NULL, ct_fork_reader_main, &r);
    CT_CHECK(e2 == 0, "pthread_create: %s", ct_err(e2));
    reading = true;
    CT_CHECK(ct_wait_flag(&r.running, CT_WAIT_MS), "the FORK reader did not start");
    pid = fork();
    CT_CHECK(pid >= 0, "fork: %s", ct_err(errno));
    if (pid == 0) {
        alarm(10);
        size_t signalled = 0;
        for (size_t i = 0; i < f->npages; i++)
            signalled += ct_touch_catch(f->base + i * f->ps + 3, 0, 0, NULL, NULL) == 1;
        _exit(signalled == f->npages ? 0 : 10 + (int)signalled);
    }
    int st = 0;
    e = wait_child(pid, CT_WAIT_MS, &st);
    pid = -1;
    CT_CHECK(e == 0, "the forked child did not finish (%s): a fault waited for a message", ct_err(e));
    CT_CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the child under EVENT_FORK: status 0x%x (%d of %zu pages raised SIGBUS)",
             st, WIFEXITED(st) ? WEXITSTATUS(st) - 10 : -1, f->npages);
    CT_CHECK(ct_join(r.th, CT_WAIT_MS) == 0, "FORK reader did not return");
    reading = false;
    CT_CHECK(r.got == 1 && r.m.event == UFFD_EVENT_FORK, "no FORK message (%s, event 0x%x)",
             r.got == 0 ? "timeout" : ct_err(r.got), r.m.event);
    child_uffd = (int)r.m.arg.fork.ufd;
    CT_CHECK(ct_read_msg(child_uffd, &m, 0) == 0, "the child's uffd got a message (event 0x%x)", m.event);
    CT_CHECK(ct_read_msg(f->uffd, &m, 0) == 0, "our uffd got a message after the fork (event 0x%x)", m.event);
out:
    if (pid > 0) wait_child(pid, 0, &st);
    if (reading) ct_join(r.th, CT_WAIT_MS);
    if (child_uffd >= 0) close(child_uffd);
    return rc;
}

static int t_sigbus(struct ct_fix *f, char *msg, size_t msglen) { return sigbus(f, false, msg, msglen); }
static int t_sigbus_wp(struct ct_fix *f, char *msg, size_t msglen) { return sigbus(f, true, msg, msglen); }

// MARK: - the events chain

#define CHAIN_LOG 64
struct chain_mon {
    pthread_t th;
    struct ct_fix *f;
    bool wp;
    atomic_int stop;
    int uffd;        ///< the parent's, then the child's after FORK
    int child_uffd;
    char *base;      ///< where the child's area is (moves on REMAP)
    uint64_t removed_start, removed_end;
    int missing, wp_faults, after_remove, errors, first_err;
    int missing_before_remap;
    int nlog;
    uint8_t log[CHAIN_LOG]; ///< event types in arrival order (faults included)
    atomic_int running;
};

static void chain_note(struct chain_mon *c, uint8_t ev) {
    if (c->nlog < CHAIN_LOG) c->log[c->nlog] = ev;
    c->nlog++;
}

static void chain_err(struct chain_mon *c, int e) {
    if (e < 0 && c->errors++ == 0) c->first_err = e;
}

static void chain_fault(struct chain_mon *c, const struct uffd_msg *m, const char *zeros) {
    uint64_t ps = c->f->ps, a = m->arg.pagefault.address & ~(ps - 1);
    int64_t done = 0;
    int e;
    if (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) {
        c->wp_faults++;
        chain_err(c, cuffd_writeprotect(c->uffd, a, ps, false, false));
        return;
    }
    if (a >= c->removed_start && a < c->removed_end) {
        // Released memory the monitor is unregistering: zeros, as the release promised.
        c->after_remove++;
        e = cuffd_copy(c->uffd, a, U(zeros), ps, 0, &done);
    } else {
        size_t i = (size_t)((a - U(c->base)) / ps);
        c->missing++;
        e = cuffd_copy(c->uffd, a, U(c->f->src + i * ps), ps, c->wp ? UFFDIO_COPY_MODE_WP : 0, &done);
    }
    if (e == -EEXIST) e = cuffd_wake(c->uffd, a, ps);
    chain_err(c, e);
}

static void *chain_main(void *arg) {
    struct chain_mon *c = arg;
    char *zeros = mmap(NULL, c->f->ps, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    atomic_store(&c->running, 1);
    while (!atomic_load(&c->stop)) {
        struct uffd_msg m;
        int r = ct_read_msg(c->uffd, &m, 20);
        if (r <= 0) continue;
        chain_note(c, m.event);
        switch (m.event) {
        case UFFD_EVENT_FORK:
            // The child's faults and events arrive on its own uffd from now on.
            c->child_uffd = c->uffd = (int)m.arg.fork.ufd;
            break;
        case UFFD_EVENT_PAGEFAULT: chain_fault(c, &m, zeros); break;
        case UFFD_EVENT_REMAP:
            c->missing_before_remap = c->missing;
            c->base = (char *)(uintptr_t)m.arg.remap.to;
            break;
        case UFFD_EVENT_REMOVE:
            c->removed_start = m.arg.remove.start;
            c->removed_end = m.arg.remove.end;
            chain_err(c, cuffd_unregister(c->uffd, m.arg.remove.start, m.arg.remove.end - m.arg.remove.start));
            break;
        default: chain_err(c, -EPROTO);
        }
    }
    if (zeros != MAP_FAILED) munmap(zeros, c->f->ps);
    return NULL;
}

// The child: reads the first half (MISSING faults; with wp, writes each page's byte back: a WP
// fault), mremaps the area to `target`, does the same for the second half there, releases it all
// (REMOVE) and checks that it reads zeros. Exit codes name the step that went wrong.
static int chain_child(struct ct_fix *f, char *target, bool wp) {
    size_t n = f->npages, half = (n + 1) / 2;
    char *area = f->base;
    for (size_t i = 0; i < n; i++) {
        if (i == half) {
            void *p = mremap(area, n * f->ps, n * f->ps, MREMAP_MAYMOVE | MREMAP_FIXED, target);
            if (p != target) return 2;
            area = target;
        }
        char *pg = area + i * f->ps;
        if (ct_check_pattern(pg, f->ps, i) >= 0) return 10 + (int)i;
        if (wp) {
            volatile char *b = pg + 9; // a WP fault: the same value written back
            *b = *b;
        }
    }
    int advice = ct_is_shared_file(f->kind) ? MADV_REMOVE : MADV_DONTNEED;
    if (madvise(area, n * f->ps, advice) != 0) return 3;
    for (size_t i = 0; i < n; i++)
        if (ct_check_zero(area + i * f->ps, f->ps) >= 0) return 4;
    return 0;
}

static int events_chain(struct ct_fix *f, bool wp, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct chain_mon c = {.f = f, .wp = wp, .uffd = f->uffd, .child_uffd = -1, .base = f->base};
    bool running = false;
    pid_t pid = -1;
    size_t n = f->npages, half = (n + 1) / 2;
    char *target = cuffd_map_anon_aligned(n * f->ps, f->ps);
    CT_CHECK(target, "mmap target: %s", ct_err(errno));
    uint64_t mode = UFFDIO_REGISTER_MODE_MISSING | (wp ? UFFDIO_REGISTER_MODE_WP : 0);
    int e = cuffd_register(f->uffd, U(f->base), n * f->ps, mode, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    e = pthread_create(&c.th, NULL, chain_main, &c);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    running = true;
    CT_CHECK(ct_wait_flag(&c.running, CT_WAIT_MS), "the monitor did not start");
    pid = fork();
    CT_CHECK(pid >= 0, "fork: %s", ct_err(errno));
    if (pid == 0) {
        alarm(10);
        _exit(chain_child(f, target, wp));
    }
    int st = 0;
    e = wait_child(pid, 2 * CT_WAIT_MS, &st);
    pid = -1;
    atomic_store(&c.stop, 1);
    CT_CHECK(ct_join(c.th, CT_WAIT_MS) == 0, "monitor did not stop");
    running = false;
    CT_CHECK(e == 0, "the child did not finish (%s): a fault or event was not answered", ct_err(e));
    // A failed resolution leaves its fault unresolved and the child dies by its alarm: name the
    // monitor's error first, it is the cause.
    CT_CHECK(c.errors == 0, "monitor: %d failed resolutions, first %s (child %s %d)", c.errors, ct_err(c.first_err),
             WIFEXITED(st) ? "exit" : "signal", WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
    CT_CHECK(!WIFSIGNALED(st), "child killed by signal %d (%s)%s", WTERMSIG(st), strsignal(WTERMSIG(st)),
             WTERMSIG(st) == SIGALRM ? ": a fault or event was not answered within its 10 s alarm" : "");
    CT_CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0,
             "child exit %d (2: mremap failed, 3: release failed, 4: not zero after release, 10+i: page i corrupt)",
             WEXITSTATUS(st));
    // The order: FORK first; REMAP once the first half faulted; REMOVE last.
    CT_CHECK(c.nlog >= 3 && c.nlog <= CHAIN_LOG, "%d messages", c.nlog);
    CT_CHECK(c.log[0] == UFFD_EVENT_FORK, "first message 0x%x, expected FORK", c.log[0]);
    int remaps = 0, removes = 0, remap_at = -1;
    for (int i = 0; i < c.nlog; i++) {
        if (c.log[i] == UFFD_EVENT_REMAP) remaps++, remap_at = i;
        if (c.log[i] == UFFD_EVENT_REMOVE) removes++;
    }
    CT_CHECK(remaps == 1 && removes >= 1, "%d REMAP and %d REMOVE events, expected 1 and at least 1", remaps, removes);
    for (int i = remap_at + 1; i < c.nlog; i++)
        if (c.log[i] == UFFD_EVENT_REMOVE) {
            for (int j = i + 1; j < c.nlog; j++)
                CT_CHECK(c.log[j] == UFFD_EVENT_REMOVE || c.log[j] == UFFD_EVENT_PAGEFAULT,
                         "event 0x%x after REMOVE", c.log[j]);
            break;
        }
    CT_CHECK(c.missing_before_remap == (int)half, "%d MISSING faults before REMAP, expected %zu", c.missing_before_remap, half);
    CT_CHECK(c.missing == (int)n, "%d MISSING faults, expected %zu (one per page)", c.missing, n);
    CT_CHECK(c.wp_faults == (wp ? (int)n : 0), "%d WP faults, expected %zu", c.wp_faults, wp ? n : 0);
out:
    if (pid > 0) wait_child(pid, 0, &st);
    if (running) {
        atomic_store(&c.stop, 1);
        ct_join(c.th, CT_WAIT_MS);
    }
    if (c.child_uffd >= 0) close(c.child_uffd);
    if (target) munmap(target, n * f->ps);
    return rc;
}

static int t_events_chain(struct ct_fix *f, char *msg, size_t msglen) { return events_chain(f, false, msg, msglen); }
static int t_events_wp_chain(struct ct_fix *f, char *msg, size_t msglen) { return events_chain(f, true, msg, msglen); }

// MARK: - the table

#define CHAIN_EVENTS (UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE)

CT_CASES(chains) = {
    {"sigbus", t_sigbus, CT_M_ALL, UFFD_FEATURE_SIGBUS | UFFD_FEATURE_EVENT_FORK, 4,
     "SIGBUS mode: every missing page raises SIGBUS and queues nothing; released pages raise it again; a child forked under EVENT_FORK gets SIGBUS on every page, no message on either uffd."},
    {"sigbus_wp", t_sigbus_wp, CT_M_ALL, UFFD_FEATURE_SIGBUS | UFFD_FEATURE_EVENT_FORK | CT_F_WP, 4,
     "SIGBUS mode with WP: a write to a page copied protected raises SIGBUS until unprotected; then as sigbus."},
    {"events_chain", t_events_chain, CT_M_ALL, CHAIN_EVENTS, 4,
     "A child forked under EVENT_FORK faults half its pages, mremaps, faults the rest and releases all: FORK, faults, REMAP, faults, REMOVE in order, one MISSING fault per page, zeros after the release."},
    {"events_wp_chain", t_events_wp_chain, CT_M_ALL, CHAIN_EVENTS | CT_F_WP, 4,
     "The events chain with pages copied protected: each page also takes one WP fault when written, through fork and mremap."},
    CT_END,
};
