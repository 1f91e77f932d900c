// In-thread resolution kernels (UFFD_FEATURE_SIGBUS): the faulting thread resolves its own fault
// in a SIGBUS handler. Two resolvers: a plain hand-written handler (range check + one ioctl,
// nothing else: the limit) and the project's cuffd_sigbus_* (table, policy, outcome model,
// stats, chaining).
#include "cubench_internal.h"

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

// The plain handler's whole state: set before its sigaction, cleared after.
static struct {
    int uffd;
    uint32_t op;
    uint64_t base, len, src;
    _Atomic uint64_t faults, errors;
    _Atomic int first_error;
} plain;

static void plain_handler(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    int saved = errno;
    uint64_t a = (uint64_t)(uintptr_t)si->si_addr & ~(CUBENCH_PAGE - 1);
    if (si->si_code != BUS_ADRERR || a - plain.base >= plain.len) _exit(99); // nothing else raises SIGBUS here
    int rc;
    if (plain.op == CUBENCH_SIGBUS_ZEROPAGE) {
        struct uffdio_zeropage z = {.range = {.start = a, .len = CUBENCH_PAGE}, .mode = 0};
        rc = ioctl(plain.uffd, UFFDIO_ZEROPAGE, &z);
    } else {
        struct uffdio_copy c = {.dst = a, .src = plain.src + (a - plain.base), .len = CUBENCH_PAGE, .mode = 0};
        rc = ioctl(plain.uffd, UFFDIO_COPY, &c);
    }
    atomic_fetch_add_explicit(&plain.faults, 1, memory_order_relaxed);
    if (rc < 0 && errno != EEXIST) {
        // Never a loop: map zeros so the access completes; the run reports the error.
        atomic_fetch_add(&plain.errors, 1);
        int zero = 0;
        atomic_compare_exchange_strong(&plain.first_error, &zero, errno);
        struct uffdio_zeropage z = {.range = {.start = a, .len = CUBENCH_PAGE}, .mode = 0};
        ioctl(plain.uffd, UFFDIO_ZEROPAGE, &z);
    }
    errno = saved;
}

int cubench_sigbus(const struct cubench_sigbus_params *p, struct cubench_result *out) {
    memset(out, 0, sizeof *out);
    if (p->op > CUBENCH_SIGBUS_ZEROPAGE || p->resolver > CUBENCH_SIGBUS_CUFFD) return -EINVAL;
    uint64_t pages = p->pages ? p->pages : 1;
    uint64_t len = pages * CUBENCH_PAGE;
    bool copy = p->op == CUBENCH_SIGBUS_COPY;
    char *region = NULL, *src = NULL;
    int uffd = -1, id = -1, rc = 0;
    bool plain_installed = false, cuffd_installed = false;
    struct sigaction old;
    uint64_t granted = 0;

    region = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) { region = NULL; rc = -ENOMEM; goto out; }
    madvise(region, len, MADV_NOHUGEPAGE);
    if (copy) {
        src = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (src == MAP_FAILED) { src = NULL; rc = -ENOMEM; goto out; }
        if (madvise(src, len, MADV_POPULATE_WRITE) < 0) { rc = -errno; goto out; }
        memset(src, 0x5a, len);
    }
    rc = cubench_uffd_open(UFFD_FEATURE_SIGBUS, &granted);
    if (rc < 0) goto out;
    uffd = rc;
    rc = cuffd_register(uffd, (uint64_t)(uintptr_t)region, len, UFFDIO_REGISTER_MODE_MISSING, NULL);
    if (rc < 0) goto out;

    if (p->resolver == CUBENCH_SIGBUS_PLAIN) {
        plain.uffd = uffd;
        plain.op = p->op;
        plain.base = (uint64_t)(uintptr_t)region;
        plain.len = len;
        plain.src = (uint64_t)(uintptr_t)src;
        atomic_store(&plain.faults, 0);
        atomic_store(&plain.errors, 0);
        atomic_store(&plain.first_error, 0);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = plain_handler;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, &old) < 0) { rc = -errno; goto out; }
        plain_installed = true;
    } else {
        struct cuffd_sigbus_range r;
        memset(&r, 0, sizeof r);
        r.start = (uint64_t)(uintptr_t)region;
        r.len = len;
        r.uffd = uffd;
        r.policy = copy ? CUFFD_SIGBUS_COPY : CUFFD_SIGBUS_ZEROPAGE;
        r.fallback = CUFFD_SIGBUS_FALLBACK_ZEROPAGE; // never kill the benchmark; errors are counted
        r.file_fd = -1;
        r.src = (uint64_t)(uintptr_t)src;
        r.flags = p->range_flags;
        id = cuffd_sigbus_add(&r);
        if (id < 0) { rc = id; goto out; }
        rc = cuffd_sigbus_install();
        if (rc < 0) goto out;
        cuffd_installed = true;
    }

    // One faulting thread on fault_cpu; nothing can block (no handler thread), so no unblock.
    struct cubench_placement pl = {.handler_cpu = -1, .fault_cpu = p->fault_cpu, .fault_threads = 1};
    uint64_t ns = 0;
    rc = cubench_run_touchers(region, len, CUBENCH_PAGE, &pl, copy, p->timeout_ms, NULL, NULL, &ns);
    out->ns = ns;
    out->bytes = len;
    out->pages = pages;
    if (p->resolver == CUBENCH_SIGBUS_PLAIN) {
        out->faults = atomic_load(&plain.faults);
        if (rc == 0 && atomic_load(&plain.errors)) rc = -atomic_load(&plain.first_error);
    } else {
        struct cuffd_sigbus_stats st;
        cuffd_sigbus_range_stats(id, &st);
        out->faults = st.signals;
        if (rc == 0 && (st.fallbacks || st.delivered)) rc = st.first_error ? -st.first_error : -EIO;
    }
    out->ioctls = out->faults;
    uint64_t sum = cubench_page_sum(region, len, 8);
    out->checksum = sum;
    if (rc == 0 && sum != (copy ? 0x5aull * pages : 0)) rc = -EILSEQ;
out:
    if (plain_installed) sigaction(SIGBUS, &old, NULL);
    if (uffd >= 0 && region) cuffd_unregister(uffd, (uint64_t)(uintptr_t)region, len);
    if (id >= 0) cuffd_sigbus_remove(id);
    // Every faulting thread is joined: putting the previous action back is safe.
    if (cuffd_installed) cuffd_sigbus_uninstall(true);
    if (uffd >= 0) close(uffd);
    if (region) munmap(region, len);
    if (src) munmap(src, len);
    return rc;
}
