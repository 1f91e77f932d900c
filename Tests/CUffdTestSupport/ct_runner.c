// Runs one C test in a forked child with a watchdog, and reserves huge pages for hugetlb tests.
#include "ct.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

// The child's end of the message pipe, and whether a message went out early.
static int report_fd = -1;
static int reported;

void ct_report_early(const char *msg) {
    if (report_fd < 0 || reported) return;
    reported = 1;
    size_t len = strlen(msg), off = 0;
    while (off < len) {
        ssize_t w = write(report_fd, msg + off, len - off);
        if (w <= 0) break;
        off += (size_t)w;
    }
}

// In the test process: the fixture the row asks for, the test, the fixture's teardown. The one
// place the C tests' set-up and teardown are written.
static int run_case(const struct cuffd_test_case *c, int kind, char *msg, size_t msglen) {
    struct ct_fix f;
    if (c->npages == 0) {
        memset(&f, 0, sizeof f);
        f.kind = kind;
        f.uffd = -1;
        f.r.memfd = -1;
        int rc = ct_need_features(ct_case_features(kind, c->features), msg, msglen);
        return rc != CUFFD_TEST_PASS ? rc : c->fn(&f, msg, msglen);
    }
    // Huge pages are few: a hugetlb fixture has at most CT_HUGE_MAX_PAGES of them.
    size_t n = c->npages;
    if (ct_is_hugetlb(kind) && n > CT_HUGE_MAX_PAGES) n = CT_HUGE_MAX_PAGES;
    int rc = ct_fix_init(&f, kind, n, ct_case_features(kind, c->features), msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    rc = c->fn(&f, msg, msglen);
    ct_fix_fini(&f);
    return rc;
}

int cuffd_test_run_case(const struct cuffd_test_case *c, int mem_kind, int timeout_sec, char *msg,
                        size_t msglen) {
    if (msglen) msg[0] = 0;
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        snprintf(msg, msglen, "pipe2: %s", strerror(errno));
        return CUFFD_TEST_FAIL;
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(msg, msglen, "fork: %s", strerror(errno));
        close(p[0]);
        close(p[1]);
        return CUFFD_TEST_FAIL;
    }
    if (pid == 0) {
        // The child runs C only and leaves with _exit: the parent's runtime is not ours.
        setpgid(0, 0); // its own group, so the watchdog also kills what the test forked
        close(p[0]);
        signal(SIGBUS, SIG_DFL);
        signal(SIGSEGV, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        report_fd = p[1];
        char buf[1024] = {0};
        int r = run_case(c, mem_kind, buf, sizeof buf);
        buf[sizeof buf - 1] = 0;
        size_t len = reported ? 0 : strlen(buf), off = 0;
        while (off < len) {
            ssize_t w = write(p[1], buf + off, len - off);
            if (w <= 0) break;
            off += (size_t)w;
        }
        _exit(r >= 0 && r <= 2 ? r : 3);
    }
    close(p[1]);
    setpgid(pid, pid); // also from here: no race with the child's own call
    fcntl(p[0], F_SETFL, O_NONBLOCK);

    char buf[1024] = {0};
    size_t got = 0;
    int status = 0;
    bool timed_out = false;
    uint64_t deadline = cuffd_now_ns() + (uint64_t)timeout_sec * 1000000000ull;
    for (;;) {
        // Drain the pipe as we go: a test process blocked on a full pipe must not look hung.
        ssize_t n = got < sizeof buf - 1 ? read(p[0], buf + got, sizeof buf - 1 - got) : 0;
        if (n > 0) got += (size_t)n;
        pid_t w = waitpid(pid, &status, WNOHANG);
        if (w == pid) break;
        if (w < 0 && errno != EINTR) {
            snprintf(msg, msglen, "waitpid: %s", strerror(errno));
            close(p[0]);
            return CUFFD_TEST_FAIL;
        }
        if (cuffd_now_ns() >= deadline) {
            timed_out = true;
            kill(-pid, SIGKILL);
            kill(pid, SIGKILL);
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
            }
            break;
        }
        usleep(2000);
    }
    for (;;) {
        ssize_t n = got < sizeof buf - 1 ? read(p[0], buf + got, sizeof buf - 1 - got) : 0;
        if (n <= 0) break;
        got += (size_t)n;
    }
    buf[got] = 0;
    close(p[0]);
    // Whatever the test forked and left behind.
    kill(-pid, SIGKILL);

    if (timed_out) {
        snprintf(msg, msglen, "timed out after %d s (test process killed by the watchdog)%s%s",
                 timeout_sec, got ? "; it said: " : "", buf);
        return CUFFD_TEST_FAIL;
    }
    if (WIFSIGNALED(status)) {
        int s = WTERMSIG(status);
        snprintf(msg, msglen, "test process killed by signal %d (SIG%s)%s%s", s,
                 sigabbrev_np(s) ? sigabbrev_np(s) : "?", got ? "; it said: " : "", buf);
        return CUFFD_TEST_FAIL;
    }
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 3;
    if (code > 2) {
        snprintf(msg, msglen, "test process exited with unexpected status %d: %s", code, buf);
        return CUFFD_TEST_FAIL;
    }
    if (code != CUFFD_TEST_PASS && got == 0) {
        snprintf(msg, msglen, "test returned %s without a reason",
                 code == CUFFD_TEST_SKIP ? "SKIP" : "FAIL");
        return code;
    }
    snprintf(msg, msglen, "%s", buf);
    return code;
}
