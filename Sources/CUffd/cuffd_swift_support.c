// Helpers for the Swift library and its tests; see cuffd_swift_support.h.
#include "CUffd.h"
#include "cuffd_swift_support.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int cuffd_eventfd(void) {
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int cuffd_eventfd_signal(int fd) {
    uint64_t one = 1;
    for (;;) {
        if (write(fd, &one, sizeof one) == (ssize_t)sizeof one) return 0;
        if (errno == EINTR) continue;
        // EAGAIN: the counter is saturated, so it is readable already.
        return errno == EAGAIN ? 0 : -errno;
    }
}

int cuffd_set_thread_name(const char *name) {
    char buf[16];
    strncpy(buf, name, sizeof buf - 1);
    buf[sizeof buf - 1] = 0;
    int rc = pthread_setname_np(pthread_self(), buf);
    return rc ? -rc : 0;
}

// MARK: - The SIGBUS/SIGSEGV catcher
// A per-thread jump buffer, armed only around one deliberate access. volatile: the store before
// the access must not be elided or sunk past it (with -O the store/NULL pair around the read
// was a dead store, so SIGBUS found no jump buffer).
static __thread sigjmp_buf *volatile catch_jmp;
static __thread volatile int catch_segv;
static __thread void *volatile catch_addr;

// What was installed before us, called for signals we do not catch.
static struct sigaction prev_bus, prev_segv;
static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;

static void on_fault_signal(int sig, siginfo_t *si, void *uc);

static void chain(int sig, siginfo_t *si, void *uc) {
    const struct sigaction *p = sig == SIGBUS ? &prev_bus : &prev_segv;
    if ((p->sa_flags & SA_SIGINFO) && p->sa_sigaction && p->sa_sigaction != on_fault_signal) {
        p->sa_sigaction(sig, si, uc);
        return;
    }
    if (!(p->sa_flags & SA_SIGINFO) && p->sa_handler != SIG_DFL && p->sa_handler != SIG_IGN) {
        p->sa_handler(sig);
        return;
    }
    // Default (SIG_IGN cannot stop a fault from recurring): die the way the signal would have
    // killed us. SA_NODEFER lets the raise land at once.
    signal(sig, SIG_DFL);
    raise(sig);
}

static void on_fault_signal(int sig, siginfo_t *si, void *uc) {
    sigjmp_buf *j = catch_jmp;
    if (j && (sig == SIGBUS || catch_segv)) {
        catch_jmp = NULL;
        catch_addr = si ? si->si_addr : NULL;
        siglongjmp(*j, sig);
    }
    chain(sig, si, uc);
}

// Checked on every use, not once: a forked test process may have reset the signal to its
// default (and pthread_once state is inherited across fork).
static void ensure_installed(int sig, struct sigaction *prev) {
    struct sigaction cur;
    if (sigaction(sig, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) &&
        cur.sa_sigaction == on_fault_signal)
        return;
    pthread_mutex_lock(&install_lock);
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault_signal;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, &old) == 0 &&
        !((old.sa_flags & SA_SIGINFO) && old.sa_sigaction == on_fault_signal))
        *prev = old;
    pthread_mutex_unlock(&install_lock);
}

int cuffd_access_catching(volatile void *addr, int op, uint64_t operand, bool catch_segv_too,
                          uint64_t *value, void **fault_addr) {
    ensure_installed(SIGBUS, &prev_bus);
    if (catch_segv_too) ensure_installed(SIGSEGV, &prev_segv);
    sigjmp_buf jb;
    int sig = sigsetjmp(jb, 1);
    if (sig) {
        catch_jmp = NULL;
        catch_segv = 0;
        if (fault_addr) *fault_addr = catch_addr;
        return sig;
    }
    catch_segv = catch_segv_too;
    catch_jmp = &jb;
    __asm__ volatile("" ::: "memory");
    uint64_t v = 0;
    switch (op) {
    case CUFFD_ACCESS_READ8: v = *(volatile uint8_t *)addr; break;
    case CUFFD_ACCESS_WRITE8: *(volatile uint8_t *)addr = (uint8_t)operand; v = (uint8_t)operand; break;
    case CUFFD_ACCESS_READ64: v = *(volatile uint64_t *)addr; break;
    case CUFFD_ACCESS_ADD64:
        v = *(volatile uint64_t *)addr + operand;
        *(volatile uint64_t *)addr = v;
        break;
    default:
        catch_jmp = NULL;
        return -EINVAL;
    }
    __asm__ volatile("" ::: "memory");
    catch_jmp = NULL;
    catch_segv = 0;
    if (value) *value = v;
    return 0;
}

int cuffd_read_catching_sigbus(const volatile uint8_t *addr, uint8_t *value) {
    uint64_t v = 0;
    int sig = cuffd_access_catching((volatile void *)addr, CUFFD_ACCESS_READ8, 0, false, &v, NULL);
    if (sig) return 1;
    if (value) *value = (uint8_t)v;
    return 0;
}

// MARK: - Bounded waits

struct timespec cuffd_deadline_after_ms(uint32_t ms) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

int cuffd_join_within(pthread_t thread, uint32_t ms) {
    struct timespec dl = cuffd_deadline_after_ms(ms);
    int e = pthread_timedjoin_np(thread, NULL, &dl);
    return e ? -e : 0;
}
