// Non-cooperative events (FORK, REMAP, REMOVE, UNMAP), EAGAIN while an event is unread, and the
// fault-message modes: SIGBUS, THREAD_ID, EXACT_ADDRESS.
#include "ct.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define U(p) ((uint64_t)(uintptr_t)(p))

// A memory-changing call made on its own thread: it blocks until its event is read.
enum { A_DONTNEED, A_MUNMAP, A_MREMAP, A_FORK_TOUCH };
struct ct_async {
    pthread_t th;
    int op;
    char *addr;
    size_t len;
    char *target;  // MREMAP
    int pipe_w;    // FORK_TOUCH: the child writes the byte it read here
    long ret;
    int err;
    atomic_int done;
};

static void *async_main(void *arg) {
    struct ct_async *a = arg;
    switch (a->op) {
    case A_DONTNEED: a->ret = madvise(a->addr, a->len, MADV_DONTNEED); break;
    case A_MUNMAP: a->ret = munmap(a->addr, a->len); break;
    case A_MREMAP: {
        void *p = mremap(a->addr, a->len, a->len, MREMAP_MAYMOVE | MREMAP_FIXED, a->target);
        a->ret = p == MAP_FAILED ? -1 : (long)(p == (void *)a->target);
        break;
    }
    case A_FORK_TOUCH: {
        pid_t p = fork();
        if (p == 0) {
            alarm(10); // never outlive the test by much, whatever happens to the parent
            uint8_t v = (uint8_t) * (volatile char *)a->addr;
            ssize_t w = write(a->pipe_w, &v, 1);
            _exit(w == 1 ? 0 : 1);
        }
        a->ret = p;
        break;
    }
    }
    a->err = errno;
    atomic_store(&a->done, 1);
    return NULL;
}

static int async_start(struct ct_async *a) {
    int e = pthread_create(&a->th, NULL, async_main, a);
    return e ? -e : 0;
}

// Registers the fixture MISSING and fills every page by COPY.
static int populate(struct ct_fix *f, uint64_t mode, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    int64_t done;
    int e = cuffd_register(f->uffd, U(f->base), f->npages * f->ps, mode, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    e = cuffd_copy(f->uffd, U(f->base), U(f->src), f->npages * f->ps, 0, &done);
    CT_CHECK(e == 0, "COPY: %s", ct_err(e));
out:
    return rc;
}

static int t_event_fork(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    int pfd[2] = {-1, -1}, child_uffd = -1;
    struct ct_async a = {0};
    bool started = false;
    struct uffd_msg m;
    int64_t done;
    int e = cuffd_register(f->uffd, U(f->base), 2 * f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    CT_CHECK(pipe2(pfd, O_CLOEXEC) == 0, "pipe: %s", ct_err(errno));
    a = (struct ct_async){.op = A_FORK_TOUCH, .addr = f->base + 5, .pipe_w = pfd[1]};
    e = async_start(&a);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    started = true;
    e = ct_read_msg(f->uffd, &m, CT_WAIT_MS);
    CT_CHECK(e == 1, "no FORK event (%s)", e == 0 ? "timeout" : ct_err(e));
    CT_CHECK(m.event == UFFD_EVENT_FORK, "expected FORK, got event 0x%x", m.event);
    child_uffd = (int)m.arg.fork.ufd;
    CT_CHECK(child_uffd >= 0 && fcntl(child_uffd, F_GETFD) >= 0, "FORK event carries no fd (%d)", child_uffd);
    CT_CHECK(ct_join(a.th, CT_WAIT_MS) == 0, "fork() did not return after its event was read");
    started = false;
    CT_CHECK(a.ret > 0, "fork: %s", ct_err(a.err));
    // The child's fault arrives on the child's uffd, not ours.
    e = ct_read_msg(child_uffd, &m, CT_WAIT_MS);
    CT_CHECK(e == 1, "no fault from the child on its uffd (%s)", e == 0 ? "timeout" : ct_err(e));
    CT_CHECK(m.event == UFFD_EVENT_PAGEFAULT && (m.arg.pagefault.address & ~(f->ps - 1)) == U(f->base),
             "child uffd: event 0x%x address 0x%llx, expected a fault at %p", m.event,
             (unsigned long long)m.arg.pagefault.address, (void *)f->base);
    CT_CHECK(ct_read_msg(f->uffd, &m, 0) == 0, "the child's fault also reached the parent's uffd");
    e = cuffd_copy(child_uffd, U(f->base), U(f->src), f->ps, 0, &done);
    CT_CHECK(e == 0, "COPY into the child: %s", ct_err(e));
    struct pollfd p = {.fd = pfd[0], .events = POLLIN};
    CT_CHECK(poll(&p, 1, CT_WAIT_MS) == 1, "the child did not report its read");
    uint8_t v = 0;
    CT_CHECK(read(pfd[0], &v, 1) == 1 && v == ct_pat(0, 5), "the child read 0x%x, expected 0x%x", v,
             ct_pat(0, 5));
    CT_CHECK(ct_present(f->base) == 0, "COPY into the child mapped the parent's page");
    int st = 0;
    CT_CHECK(waitpid((pid_t)a.ret, &st, 0) == (pid_t)a.ret && WIFEXITED(st) && WEXITSTATUS(st) == 0,
             "child status 0x%x", st);
    a.ret = 0;
out:
    if (started) ct_join(a.th, 1000);
    if (a.ret > 0) {
        kill((pid_t)a.ret, SIGKILL);
        waitpid((pid_t)a.ret, NULL, 0);
    }
    if (child_uffd >= 0) close(child_uffd);
    if (pfd[0] >= 0) close(pfd[0]);
    if (pfd[1] >= 0) close(pfd[1]);
    return rc;
}

static int t_event_remap(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct ct_async a = {0};
    char *target = NULL;
    struct uffd_msg m;
    uint64_t len = 4 * f->ps;
    CT_TRY(populate(f, UFFDIO_REGISTER_MODE_MISSING, msg, msglen));
    target = cuffd_map_anon_aligned(len, f->ps);
    CT_CHECK(target, "mmap target failed");
    a = (struct ct_async){.op = A_MREMAP, .addr = f->base, .len = len, .target = target};
    int e = async_start(&a);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    e = ct_read_msg(f->uffd, &m, CT_WAIT_MS);
    CT_CHECK(e == 1, "no REMAP event (%s)", e == 0 ? "timeout" : ct_err(e));
    CT_CHECK(ct_join(a.th, CT_WAIT_MS) == 0, "mremap did not return after its event was read");
    CT_CHECK(a.ret == 1, "mremap: %s", ct_err(a.err));
    f->r.addr = target; // the region lives there now
    f->base = target;
    target = NULL;
    CT_CHECK(m.event == UFFD_EVENT_REMAP, "expected REMAP, got event 0x%x", m.event);
    CT_CHECK(m.arg.remap.from == U(a.addr) && m.arg.remap.to == U(f->base) && m.arg.remap.len == len,
             "REMAP from 0x%llx to 0x%llx len 0x%llx, expected %p -> %p len 0x%llx",
             (unsigned long long)m.arg.remap.from, (unsigned long long)m.arg.remap.to,
             (unsigned long long)m.arg.remap.len, (void *)a.addr, (void *)f->base,
             (unsigned long long)len);
    for (size_t i = 0; i < 4; i++)
        CT_CHECK(ct_check_pattern(f->base + i * f->ps, f->ps, i) < 0, "page %zu lost by mremap", i);
out:
    if (target) munmap(target, 4 * f->ps);
    return rc;
}

static int remove_or_unmap(struct ct_fix *f, int op, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct ct_async a = {0};
    uint32_t want = op == A_DONTNEED ? UFFD_EVENT_REMOVE : UFFD_EVENT_UNMAP;
    const char *what = op == A_DONTNEED ? "REMOVE" : "UNMAP";
    struct uffd_msg m;
    CT_TRY(populate(f, UFFDIO_REGISTER_MODE_MISSING, msg, msglen));
    a = (struct ct_async){.op = op, .addr = f->base + f->ps, .len = 2 * f->ps};
    int e = async_start(&a);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    e = ct_read_msg(f->uffd, &m, CT_WAIT_MS);
    CT_CHECK(e == 1, "no %s event (%s)", what, e == 0 ? "timeout" : ct_err(e));
    CT_CHECK(ct_join(a.th, CT_WAIT_MS) == 0, "the call did not return after its event was read");
    CT_CHECK(a.ret == 0, "%s: %s", op == A_DONTNEED ? "madvise" : "munmap", ct_err(a.err));
    CT_CHECK(m.event == want, "expected %s (0x%x), got event 0x%x", what, want, m.event);
    CT_CHECK(m.arg.remove.start == U(f->base + f->ps) && m.arg.remove.end == U(f->base + 3 * f->ps),
             "%s [0x%llx, 0x%llx), expected [%p, %p)", what, (unsigned long long)m.arg.remove.start,
             (unsigned long long)m.arg.remove.end, (void *)(f->base + f->ps), (void *)(f->base + 3 * f->ps));
    CT_CHECK(ct_read_msg(f->uffd, &m, 0) == 0, "a second message (event 0x%x) after %s", m.event, what);
    if (op == A_DONTNEED) {
        CT_CHECK(ct_present(f->base + f->ps) == 0 && ct_present(f->base + 2 * f->ps) == 0,
                 "pages still mapped after MADV_DONTNEED");
        CT_CHECK(ct_check_pattern(f->base, f->ps, 0) < 0, "page 0 lost");
    }
    CT_CHECK(ct_check_pattern(f->base + 3 * f->ps, f->ps, 3) < 0, "page 3 lost");
out:
    return rc;
}

static int t_event_remove(struct ct_fix *f, char *msg, size_t msglen) {
    return remove_or_unmap(f, A_DONTNEED, msg, msglen);
}

static int t_event_unmap(struct ct_fix *f, char *msg, size_t msglen) {
    return remove_or_unmap(f, A_MUNMAP, msg, msglen);
}

static int t_eagain_while_remove_unread(struct ct_fix *f, char *msg, size_t msglen) {
    int kind = f->kind;
    int rc = CUFFD_TEST_PASS;
    struct ct_async a = {0};
    bool started = false;
    struct uffd_msg m;
    int64_t done = -1;
    int e = cuffd_register(f->uffd, U(f->base), 4 * f->ps, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    e = cuffd_copy(f->uffd, U(f->base), U(f->src), 2 * f->ps, 0, &done);
    CT_CHECK(e == 0, "COPY: %s", ct_err(e));
    a = (struct ct_async){.op = A_DONTNEED, .addr = f->base, .len = 2 * f->ps};
    e = async_start(&a);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    started = true;
    CT_CHECK(cuffd_wait_readable(f->uffd, CT_WAIT_MS) == 1, "no REMOVE event queued");
    // The REMOVE is queued and unread: every resolve verb refuses with EAGAIN and no progress.
    char *p2 = f->base + 2 * f->ps, *p3 = f->base + 3 * f->ps;
    done = -1;
    e = cuffd_copy(f->uffd, U(p2), U(f->src), f->ps, 0, &done);
    CT_CHECK(e == -EAGAIN && done == 0, "COPY: %s done %lld, expected EAGAIN 0", ct_err(e), (long long)done);
    done = -1;
    if (!ct_is_hugetlb(kind)) {
        e = cuffd_zeropage(f->uffd, U(p3), f->ps, 0, &done);
        CT_CHECK(e == -EAGAIN && done == 0, "ZEROPAGE: %s done %lld, expected EAGAIN 0", ct_err(e),
                 (long long)done);
    }
    if (kind == CUFFD_MEM_ANON) {
        done = -1;
        e = cuffd_move(f->uffd, U(p2), U(f->src + f->ps), f->ps, 0, &done);
        CT_CHECK(e == -EAGAIN && done == 0, "MOVE: %s done %lld, expected EAGAIN 0", ct_err(e),
                 (long long)done);
    }
    done = -1;
    e = cuffd_continue(f->uffd, U(p2), f->ps, 0, &done);
    CT_CHECK(e == -EAGAIN && done == 0, "CONTINUE: %s done %lld, expected EAGAIN 0", ct_err(e), (long long)done);
    done = -1;
    e = cuffd_poison(f->uffd, U(p3), f->ps, 0, &done);
    CT_CHECK(e == -EAGAIN && done == 0, "POISON: %s done %lld, expected EAGAIN 0", ct_err(e), (long long)done);
    e = cuffd_writeprotect(f->uffd, U(p3), f->ps, true, false);
    CT_CHECK(e == -EAGAIN, "WRITEPROTECT: %s, expected EAGAIN after bounded retries", ct_err(e));
    CT_CHECK(!atomic_load(&a.done), "MADV_DONTNEED returned before its REMOVE event was read");
    CT_CHECK(ct_present(p2) == 0 && ct_present(p3) == 0, "an op made progress while refused");
    e = ct_read_msg(f->uffd, &m, CT_WAIT_MS);
    CT_CHECK(e == 1 && m.event == UFFD_EVENT_REMOVE, "expected the REMOVE event (%s, event 0x%x)",
             ct_err(e), m.event);
    CT_CHECK(ct_join(a.th, CT_WAIT_MS) == 0, "madvise did not return after its event was read");
    started = false;
    // Once read, the retry succeeds (a short window may still say EAGAIN).
    for (int i = 0; i < 1000; i++) {
        e = cuffd_copy(f->uffd, U(p2), U(f->src + 2 * f->ps), f->ps, 0, &done);
        if (e != -EAGAIN) break;
        usleep(1000);
    }
    CT_CHECK(e == 0 && done == (int64_t)f->ps, "COPY after the event was read: %s", ct_err(e));
    CT_CHECK(ct_check_pattern(p2, f->ps, 2) < 0, "page 2 wrong");
out:
    if (started) {
        struct uffd_msg drain[4];
        cuffd_read_msgs(f->uffd, drain, 4);
        ct_join(a.th, 1000);
    }
    return rc;
}

static int t_sigbus_mode(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct uffd_msg m;
    int64_t done;
    void *fa = NULL;
    uint8_t v = 0;
    int e = cuffd_register(f->uffd, U(f->base), 2 * f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    // This test runs in its own process (the runner's child); the SIGBUS is caught here.
    int sig = ct_touch_catch(f->base + 10, 0, 0, &v, &fa);
    CT_CHECK(sig == 1, "reading a missing page in SIGBUS mode did not raise SIGBUS");
    CT_CHECK((uintptr_t)fa >= U(f->base) && (uintptr_t)fa < U(f->base + f->ps), "SIGBUS at %p, outside page 0 %p",
             fa, (void *)f->base);
    sig = ct_touch_catch(f->base + f->ps, 1, 1, NULL, &fa);
    CT_CHECK(sig == 1, "writing a missing page in SIGBUS mode did not raise SIGBUS");
    CT_CHECK(ct_read_msg(f->uffd, &m, 0) == 0, "SIGBUS mode queued a message (event 0x%x)", m.event);
    e = cuffd_copy(f->uffd, U(f->base), U(f->src), f->ps, 0, &done);
    CT_CHECK(e == 0, "COPY: %s", ct_err(e));
    sig = ct_touch_catch(f->base + 10, 0, 0, &v, &fa);
    CT_CHECK(sig == 0 && v == ct_pat(0, 10), "page 0 after COPY: sigbus %d value 0x%x", sig, v);
    sig = ct_touch_catch(f->base + f->ps + 10, 0, 0, &v, &fa);
    CT_CHECK(sig == 1, "page 1 (still missing) did not raise SIGBUS");
out:
    return rc;
}

// Faults at page 1 + 123 from a thread; checks the message's address and ptid.
static int fault_msg(struct ct_fix *f, uint64_t feat, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct uffd_msg m;
    int64_t done;
    struct ct_toucher t = {0};
    bool started = false;
    char *a = f->base + f->ps + 123;
    int e = cuffd_register(f->uffd, U(f->base), 2 * f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    t = (struct ct_toucher){.addr = a, .count = 1, .write = 1, .wval = 0x77};
    e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    started = true;
    e = ct_read_msg(f->uffd, &m, CT_WAIT_MS);
    CT_CHECK(e == 1 && m.event == UFFD_EVENT_PAGEFAULT, "no fault (%s)", ct_err(e));
    uint64_t want_addr = (feat & UFFD_FEATURE_EXACT_ADDRESS) ? U(a) : U(f->base + f->ps);
    uint32_t want_tid = (feat & UFFD_FEATURE_THREAD_ID) ? (uint32_t)t.tid : 0;
    CT_CHECK(m.arg.pagefault.address == want_addr, "fault address 0x%llx, expected 0x%llx (%s)",
             (unsigned long long)m.arg.pagefault.address, (unsigned long long)want_addr,
             (feat & UFFD_FEATURE_EXACT_ADDRESS) ? "exact" : "page-masked");
    CT_CHECK(m.arg.pagefault.feat.ptid == want_tid, "ptid %u, expected %u (faulting thread %d, main %d)",
             m.arg.pagefault.feat.ptid, want_tid, (int)t.tid, (int)cuffd_gettid());
    CT_CHECK(m.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE, "write fault without FLAG_WRITE (flags 0x%llx)",
             (unsigned long long)m.arg.pagefault.flags);
    e = cuffd_copy(f->uffd, U(f->base + f->ps), U(f->src + f->ps), f->ps, 0, &done);
    CT_CHECK(e == 0, "COPY: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "faulting thread not woken");
    started = false;
    CT_CHECK((uint8_t)*a == 0x77, "the write was lost");
out:
    (void)started; // a blocked thread dies with the test process
    return rc;
}

static int t_thread_id_exact_address(struct ct_fix *f, char *msg, size_t msglen) {
    return fault_msg(f, UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_EXACT_ADDRESS, msg, msglen);
}

static int t_address_masked(struct ct_fix *f, char *msg, size_t msglen) {
    return fault_msg(f, 0, msg, msglen);
}

// MARK: - the table

CT_CASES(events) = {
    {"event_fork", t_event_fork, CT_M_ALL, UFFD_FEATURE_EVENT_FORK, 2,
     "EVENT_FORK: the child's uffd arrives in the message; the child's faults arrive on it."},
    {"event_remap", t_event_remap, CT_M_ALL, UFFD_FEATURE_EVENT_REMAP, 4,
     "EVENT_REMAP: mremap reports from/to/len and the data moves along."},
    {"event_remove", t_event_remove, CT_M_ALL, UFFD_FEATURE_EVENT_REMOVE, 4,
     "EVENT_REMOVE: MADV_DONTNEED reports start/end and blocks until the event is read."},
    {"event_unmap", t_event_unmap, CT_M_ALL, UFFD_FEATURE_EVENT_UNMAP, 4,
     "EVENT_UNMAP: munmap reports start/end."},
    {"eagain_while_remove_unread", t_eagain_while_remove_unread, CT_M_ALL, UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_POISON | CT_F_MOVE_ANON | CT_F_WP_FILE, 4,
     "While a REMOVE is unread, COPY/ZEROPAGE/MOVE/CONTINUE/POISON/WRITEPROTECT give EAGAIN with nothing done; after it is read, the retry succeeds."},
    {"sigbus_mode", t_sigbus_mode, CT_M_ALL, UFFD_FEATURE_SIGBUS, 2,
     "UFFD_FEATURE_SIGBUS: a missing page raises SIGBUS (caught in the isolated test process), no message."},
    {"thread_id_exact_address", t_thread_id_exact_address, CT_M_ALL, UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_EXACT_ADDRESS, 2,
     "THREAD_ID: ptid is the faulting thread's tid; EXACT_ADDRESS: the address is not masked."},
    {"address_masked", t_address_masked, CT_M_ANON | CT_M_HUGE, 0, 2,
     "Without those features the address is masked to the page and ptid is 0."},
    CT_END,
};
