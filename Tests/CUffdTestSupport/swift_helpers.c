// Test-only helpers the Swift tests call (they used to ship in CUffd): fork-and-read children
// mremap, which is variadic and does not reach Swift, and whether a file is in tmpfs.
#include "CUffdTestSupport.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void kill_and_reap(pid_t pid) {
    kill(pid, SIGKILL);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
    }
}

// fork() with a pipe from the child to the parent (p[1] -> p[0]): the child's pid, 0 in the
// child, or -errno with no fd left open.
static pid_t fork_with_pipe(int p[2]) {
    if (pipe2(p, O_CLOEXEC) < 0) return -errno;
    pid_t pid = fork();
    if (pid < 0) {
        int e = -errno;
        close(p[0]);
        close(p[1]);
        return e;
    }
    return pid;
}

int cuffd_fork_and_sum(const void *addr, uint64_t len, uint64_t stride, int timeout_ms,
                       uint64_t *sum) {
    int p[2];
    pid_t pid = fork_with_pipe(p);
    if (pid < 0) return (int)pid;
    if (pid == 0) {
        // Async-signal-safe only: the parent is multi-threaded.
        const volatile uint8_t *b = addr;
        uint64_t s = 0;
        if (!stride) stride = 1;
        for (uint64_t off = 0; off < len; off += stride) s += b[off];
        ssize_t w = write(p[1], &s, sizeof s);
        _exit(w == (ssize_t)sizeof s ? 0 : 1);
    }
    close(p[1]);
    struct pollfd pfd = {.fd = p[0], .events = POLLIN};
    int rc = 0;
    for (;;) {
        int n = poll(&pfd, 1, timeout_ms);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            rc = n == 0 ? -ETIMEDOUT : -errno;
            break;
        }
        uint64_t s = 0;
        if (read(p[0], &s, sizeof s) != (ssize_t)sizeof s) {
            rc = -EIO;
            break;
        }
        if (sum) *sum = s;
        break;
    }
    close(p[0]);
    if (rc) {
        kill_and_reap(pid);
    } else {
        int st = 0;
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
        }
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) rc = -ECHILD;
    }
    return rc;
}

int cuffd_child_blocks_when_unhandled(uint64_t len, int timeout_ms) {
    pid_t pid = fork();
    if (pid < 0) return -errno;
    if (pid == 0) {
        int fd = cuffd_open(CUFFD_OPEN_USER_MODE_ONLY | CUFFD_OPEN_ALLOW_KERNEL_FAULTS, NULL, NULL);
        if (fd < 0) _exit(101);
        if (cuffd_api(fd, 0, NULL, NULL) < 0) _exit(102);
        void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) _exit(103);
        if (cuffd_register(fd, (uint64_t)(uintptr_t)m, len, UFFDIO_REGISTER_MODE_MISSING, NULL) < 0)
            _exit(104);
        volatile uint8_t *b = m;
        uint8_t v = b[0]; // blocks: nobody reads the fd
        _exit(v == 0 ? 0 : 1);
    }
    struct timespec step = {.tv_sec = 0, .tv_nsec = 10 * 1000 * 1000};
    for (int waited = 0; waited < timeout_ms; waited += 10) {
        int st = 0;
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) {
            if (WIFEXITED(st) && WEXITSTATUS(st) > 100) return -WEXITSTATUS(st);
            return 0;
        }
        nanosleep(&step, NULL);
    }
    kill_and_reap(pid);
    return 1;
}

int cuffd_fd_in_memory(int fd) {
    struct statfs st;
    if (fstatfs(fd, &st) < 0) return -errno;
    return st.f_type == TMPFS_MAGIC;
}

int cuffd_mremap_fixed(void *old_addr, uint64_t len, void *new_addr) {
    void *p = mremap(old_addr, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, new_addr);
    return p == MAP_FAILED ? -errno : 0;
}

int cuffd_fork_memory_child(uint64_t len, int hugetlb, uint64_t touch, uint64_t *addr) {
    int p[2];
    pid_t pid = fork_with_pipe(p);
    if (pid < 0) return (int)pid;
    if (pid == 0) {
        // Async-signal-safe only: the parent is multi-threaded.
        alarm(60);
        int flags = MAP_PRIVATE | MAP_ANONYMOUS | (hugetlb ? MAP_HUGETLB : 0);
        void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, -1, 0);
        uint64_t a = m == MAP_FAILED ? 0 : (uint64_t)(uintptr_t)m;
        if (a) {
            volatile uint8_t *b = m;
            for (uint64_t off = 0; off < touch && off < len; off += 4096) b[off] = 1;
        }
        if (write(p[1], &a, sizeof a) != (ssize_t)sizeof a || !a) _exit(101);
        for (;;) pause();
    }
    close(p[1]);
    uint64_t a = 0;
    struct pollfd pfd = {.fd = p[0], .events = POLLIN};
    int rc = poll(&pfd, 1, 20000) == 1 && read(p[0], &a, sizeof a) == (ssize_t)sizeof a ? 0 : -ETIMEDOUT;
    close(p[0]);
    if (rc || !a) {
        kill_and_reap(pid);
        return rc ? rc : -101;
    }
    *addr = a;
    return pid;
}

int cuffd_kill_child(int pid) {
    if (kill(pid, SIGKILL) < 0) return -errno;
    while (waitpid(pid, NULL, 0) < 0) {
        if (errno != EINTR) return -errno;
    }
    return 0;
}
