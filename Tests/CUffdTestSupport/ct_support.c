// The core's shared helpers the tests, reliability children and benchmarks use: the one
// SIGBUS/SIGSEGV catcher (and its chaining to a handler installed before it) and the deadline.
#include "ct.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

// A handler of "the application", installed before the catcher's first use.
static sigjmp_buf app_jmp;
static volatile int app_calls;
static void *volatile app_addr;

static void app_handler(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    app_calls++;
    app_addr = si->si_addr;
    siglongjmp(app_jmp, 1);
}

// Two pages of a one-page memfd: the second lies beyond the end of the file (SIGBUS on access).
static char *map_past_eof(int *fd_out, size_t ps) {
    int fd = cuffd_memfd_create("ct-sigbus", MFD_CLOEXEC);
    if (fd < 0) return NULL;
    if (ftruncate(fd, (off_t)ps) < 0) {
        close(fd);
        return NULL;
    }
    char *p = mmap(NULL, 2 * ps, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        close(fd);
        return NULL;
    }
    *fd_out = fd;
    return p;
}

static int t_sigbus_catcher_chains(struct ct_fix *f, char *msg, size_t msglen) {
    (void)f;
    int rc = CUFFD_TEST_PASS, fd = -1;
    size_t ps = cuffd_page_size();
    char *p = map_past_eof(&fd, ps);
    CT_CHECK(p, "memfd mapping: %s", ct_err(errno));
    struct sigaction sa = {0};
    sa.sa_sigaction = app_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    CT_CHECK(sigaction(SIGBUS, &sa, NULL) == 0, "sigaction: %s", ct_err(errno));

    // Inside a catching access: the catcher takes the signal, the application sees nothing.
    uint8_t v = 0xAA;
    CT_CHECK(cuffd_read_catching_sigbus((volatile uint8_t *)p, &v) == 0 && v == 0,
             "read of a file page: not 0 (got %u)", v);
    CT_CHECK(cuffd_read_catching_sigbus((volatile uint8_t *)p + ps, &v) == 1,
             "a read past the end of the file did not report SIGBUS");
    CT_CHECK(app_calls == 0, "the application's handler ran for a caught access");
    void *fa = NULL;
    int sig = cuffd_access_catching(p + ps + 16, CUFFD_ACCESS_WRITE8, 7, false, NULL, &fa);
    CT_CHECK(sig == SIGBUS && fa == p + ps + 16, "write past EOF: signal %d at %p, expected SIGBUS at %p",
             sig, fa, (void *)(p + ps + 16));

    // Outside: the signal reaches the handler that was there before (it used to be re-raised
    // with the default action, killing the process).
    if (sigsetjmp(app_jmp, 1) == 0) {
        volatile char c = *(volatile char *)(p + ps + 8);
        (void)c;
        CT_FAIL("a read past the end of the file raised nothing");
    }
    CT_CHECK(app_calls == 1 && app_addr == p + ps + 8,
             "the earlier handler was not chained to: %d calls, address %p (expected %p)", app_calls,
             app_addr, (void *)(p + ps + 8));
    // And the catcher still works after chaining.
    CT_CHECK(cuffd_read_catching_sigbus((volatile uint8_t *)p + ps, &v) == 1 && app_calls == 1,
             "catcher after a chained signal");

    // With no earlier handler, an uncaught SIGBUS keeps its default action: the process dies
    // of SIGBUS (not a hang, not another signal).
    pid_t pid = fork();
    CT_CHECK(pid >= 0, "fork: %s", ct_err(errno));
    if (pid == 0) {
        signal(SIGBUS, SIG_DFL);
        if (cuffd_read_catching_sigbus((volatile uint8_t *)p + ps, &v) != 1) _exit(3);
        volatile char c = *(volatile char *)(p + ps);
        (void)c;
        _exit(4);
    }
    int st = 0;
    CT_CHECK(waitpid(pid, &st, 0) == pid, "waitpid: %s", ct_err(errno));
    CT_CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGBUS, "child status 0x%x, expected death by SIGBUS", st);
out:
    signal(SIGBUS, SIG_DFL);
    if (p) munmap(p, 2 * ps);
    if (fd >= 0) close(fd);
    return rc;
}

// SIGSEGV only when asked, and the 64-bit operations.
static int t_access_catching_ops(struct ct_fix *f, char *msg, size_t msglen) {
    (void)f;
    int rc = CUFFD_TEST_PASS;
    size_t ps = cuffd_page_size();
    char *p = mmap(NULL, 2 * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CT_CHECK(p != MAP_FAILED, "mmap: %s", ct_err(errno));
    CT_CHECK(mprotect(p + ps, ps, PROT_NONE) == 0, "mprotect: %s", ct_err(errno));
    uint64_t v = 0;
    *(uint64_t *)p = 40;
    CT_CHECK(cuffd_access_catching(p, CUFFD_ACCESS_ADD64, 2, false, &v, NULL) == 0 && v == 42 &&
                 *(uint64_t *)p == 42, "ADD64: %llu", (unsigned long long)v);
    CT_CHECK(cuffd_access_catching(p, CUFFD_ACCESS_READ64, 0, false, &v, NULL) == 0 && v == 42, "READ64");
    CT_CHECK(cuffd_access_catching(p + 8, CUFFD_ACCESS_WRITE8, 0x1FF, false, &v, NULL) == 0 &&
                 (uint8_t)p[8] == 0xFF, "WRITE8 stores the low byte");
    void *fa = NULL;
    int sig = cuffd_access_catching(p + ps + 8, CUFFD_ACCESS_READ64, 0, true, &v, &fa);
    CT_CHECK(sig == SIGSEGV && fa == p + ps + 8, "PROT_NONE read: signal %d at %p", sig, fa);
    CT_CHECK(cuffd_access_catching(p, 99, 0, false, &v, NULL) == -EINVAL, "unknown op accepted");
    // Without catch_segv a SIGSEGV is not ours: the process dies of it.
    pid_t pid = fork();
    CT_CHECK(pid >= 0, "fork: %s", ct_err(errno));
    if (pid == 0) {
        signal(SIGSEGV, SIG_DFL);
        cuffd_access_catching(p + ps, CUFFD_ACCESS_READ8, 0, false, &v, NULL);
        _exit(4);
    }
    int st = 0;
    CT_CHECK(waitpid(pid, &st, 0) == pid, "waitpid: %s", ct_err(errno));
    CT_CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV, "child status 0x%x, expected death by SIGSEGV", st);
out:
    if (p != MAP_FAILED) munmap(p, 2 * ps);
    return rc;
}

static void *sleep_ms(void *arg) {
    usleep((useconds_t)(uintptr_t)arg * 1000);
    return NULL;
}

static int t_deadline_join(struct ct_fix *f, char *msg, size_t msglen) {
    (void)f;
    int rc = CUFFD_TEST_PASS;
    pthread_t th;
    bool running = false;
    CT_CHECK(pthread_create(&th, NULL, sleep_ms, (void *)(uintptr_t)600) == 0, "pthread_create");
    running = true;
    uint64_t t0 = cuffd_now_ns();
    CT_CHECK(cuffd_join_within(th, 50) == -ETIMEDOUT, "a thread sleeping 600 ms joined within 50 ms");
    uint64_t waited = (cuffd_now_ns() - t0) / 1000000;
    CT_CHECK(waited >= 45, "gave up after %llu ms, before the 50 ms deadline", (unsigned long long)waited);
    CT_CHECK(cuffd_join_within(th, 10000) == 0, "the thread did not finish within 10 s");
    running = false;
    struct timespec now, dl = cuffd_deadline_after_ms(1500);
    clock_gettime(CLOCK_REALTIME, &now);
    int64_t ms = (int64_t)(dl.tv_sec - now.tv_sec) * 1000 + (dl.tv_nsec - now.tv_nsec) / 1000000;
    CT_CHECK(ms > 1400 && ms <= 1500 && dl.tv_nsec >= 0 && dl.tv_nsec < 1000000000L,
             "deadline 1500 ms ahead is %lld ms ahead (nsec %ld)", (long long)ms, dl.tv_nsec);
out:
    if (running) pthread_detach(th);
    return rc;
}

// MARK: - huge page leases

// Another test run's lease ends while ours is in use: our pages stay. Each side asks for more than
// the pool has free, so each raises it. Before the leases (a saved absolute nr_hugepages written
// back at the end), the other run's restore took our pages and the unreserved allocations below
// raised SIGBUS.
static int t_hugetlb_pool_leases(struct ct_fix *f, char *msg, size_t msglen) {
    (void)f;
    int rc = CUFFD_TEST_PASS;
    const uint64_t huge = cuffd_hugepage_size();
    long n = ct_hugetlb_available();
    char *area = MAP_FAILED;
    int held = 0, to_child[2] = {-1, -1}, to_parent[2] = {-1, -1};
    pid_t pid = -1;
    if (huge == 0 || n < 0 || n > 512) {
        snprintf(msg, msglen, "HugePages_Free - HugePages_Rsvd is %ld: not a pool this test can double", n);
        return CUFFD_TEST_SKIP;
    }
    n += 4;
    CT_CHECK(pipe2(to_child, O_CLOEXEC) == 0 && pipe2(to_parent, O_CLOEXEC) == 0, "pipe2: %s", ct_err(errno));
    pid = fork();
    CT_CHECK(pid >= 0, "fork: %s", ct_err(errno));
    if (pid == 0) {
        // The other run: lease, let the parent lease beside it, give its lease back.
        alarm(20);
        ct_hugetlb_forget_leases();
        char b = cuffd_test_hugetlb_reserve(n) == 0 ? 'y' : 'n';
        if (write(to_parent[1], &b, 1) != 1 || read(to_child[0], &b, 1) != 1) _exit(2);
        cuffd_test_hugetlb_restore();
        _exit(0);
    }
    char b = 0;
    CT_CHECK(read(to_parent[0], &b, 1) == 1, "the other lease's process did not answer");
    if (b != 'y') {
        snprintf(msg, msglen, "cannot lease %ld huge pages (not root, or no memory)", n);
        rc = CUFFD_TEST_SKIP;
        goto out;
    }
    int e = cuffd_test_hugetlb_reserve(n);
    held = 1;
    if (e != 0) {
        snprintf(msg, msglen, "cannot lease %ld more huge pages: %s", n, ct_err(e));
        rc = CUFFD_TEST_SKIP;
        goto out;
    }
    CT_CHECK(write(to_child[1], &b, 1) == 1, "write: %s", ct_err(errno));
    int st = 0;
    CT_CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0, "the other lease's process: status 0x%x", st);
    pid = -1;
    CT_CHECK(ct_hugetlb_available() >= n, "%ld unreserved huge pages after the other lease ended, leased %ld",
             ct_hugetlb_available(), n);
    // Unreserved allocations, as a private mapping's forked child makes them: one per page.
    area = mmap(NULL, (size_t)n * huge, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_NORESERVE, -1, 0);
    CT_CHECK(area != MAP_FAILED, "mmap of %ld huge pages: %s", n, ct_err(errno));
    for (long i = 0; i < n; i++)
        CT_CHECK(ct_touch_catch(area + (uint64_t)i * huge, 1, 1, NULL, NULL) == 0,
                 "huge page %ld of %ld leased: SIGBUS (the pool lost our pages)", i, n);
out:
    if (area != MAP_FAILED) munmap(area, (size_t)n * huge);
    if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    }
    if (held) cuffd_test_hugetlb_restore();
    for (int i = 0; i < 2; i++) {
        if (to_child[i] >= 0) close(to_child[i]);
        if (to_parent[i] >= 0) close(to_parent[i]);
    }
    return rc;
}

// MARK: - the table

CT_CASES(support) = {
    {"sigbus_catcher_chains", t_sigbus_catcher_chains, 0, 0, 0,
     "The SIGBUS catcher takes signals of its own accesses only; others reach the handler installed before it, or kill."},
    {"access_catching_ops", t_access_catching_ops, 0, 0, 0,
     "cuffd_access_catching: READ64/ADD64/WRITE8, SIGSEGV caught only when asked, unknown op EINVAL."},
    {"deadline_join", t_deadline_join, 0, 0, 0,
     "cuffd_join_within times out at its deadline and joins a finished thread."},
    {"hugetlb_pool_leases", t_hugetlb_pool_leases, 0, 0, 0,
     "A huge page lease survives another process's lease ending: the pool keeps our pages for unreserved allocations."},
    CT_END,
};
