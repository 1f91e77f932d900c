// Write-protect state as the page tables hold it, read through the pagemap uffd-wp bit (bit 57):
// across fork() with and without EVENT_FORK, for long-term pinned pages, on unpopulated-page
// markers, and through zaps and page-out (the PTE markers that keep a protection alive).
#include "ct.h"

#include <fcntl.h>
#include <linux/io_uring.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#define U(p) ((uint64_t)(uintptr_t)(p))

static bool wp_bit(uint64_t entry) { return (entry & CT_PM_UFFD_WP) != 0; }

// Checks the pagemap uffd-wp bit of addr in this process.
static int expect_wp(const char *what, const char *addr, bool want, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    uint64_t e = 0;
    int r = ct_pagemap_entry(addr, &e);
    CT_CHECK(r == 0, "pagemap: %s", ct_err(r));
    CT_CHECK(wp_bit(e) == want, "%s: pagemap entry 0x%llx has uffd-wp %d, expected %d", what,
             (unsigned long long)e, wp_bit(e), want);
out:
    return rc;
}

// MARK: - a long-term pin from user space

// IORING_REGISTER_BUFFERS pins the buffer's pages long-term (FOLL_WRITE | FOLL_LONGTERM), the
// pin the kernel's gup_test takes read-only; closing the ring drops it.
static int pin_pages(void *addr, size_t len) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int fd = (int)syscall(__NR_io_uring_setup, 1, &p);
    if (fd < 0) return -errno;
    struct iovec iov = {.iov_base = addr, .iov_len = len};
    if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_BUFFERS, &iov, 1) < 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    return fd;
}

// MARK: - fork

// Forks a child that sends back its own pagemap entry for addr; with pin_in_child it first pins
// that page long-term. With EVENT_FORK fork() waits until the FORK message is read: a thread
// reads it, and the child's uffd is closed once the child is gone.
static int child_entry(struct ct_fix *f, char *addr, bool with_event, bool pin_in_child,
                       uint64_t *entry, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    int p[2] = {-1, -1};
    struct ct_fork_reader r = {.uffd = f->uffd, .got = -1};
    bool reading = false;
    pid_t pid = -1;
    CT_CHECK(pipe2(p, O_CLOEXEC) == 0, "pipe: %s", ct_err(errno));
    if (with_event) {
        int e = pthread_create(&r.th, NULL, ct_fork_reader_main, &r);
        CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
        reading = true;
        CT_CHECK(ct_wait_flag(&r.running, CT_WAIT_MS), "the FORK reader did not start");
    }
    pid = fork();
    CT_CHECK(pid >= 0, "fork: %s", ct_err(errno));
    if (pid == 0) {
        alarm(10); // never outlive the test by much
        int64_t res[2] = {0, 0};
        if (pin_in_child) {
            int fd = pin_pages(addr, f->ps);
            if (fd < 0) res[0] = 1000 - fd; // 1000 + errno: the pin failed
        }
        uint64_t e = 0;
        if (res[0] == 0) res[0] = ct_pagemap_entry(addr, &e);
        res[1] = (int64_t)e;
        _exit(write(p[1], res, sizeof res) == sizeof res ? 0 : 1);
    }
    close(p[1]);
    p[1] = -1;
    struct pollfd pf = {.fd = p[0], .events = POLLIN};
    CT_CHECK(poll(&pf, 1, CT_WAIT_MS) == 1, "the child did not report its pagemap entry");
    int64_t res[2];
    CT_CHECK(read(p[0], res, sizeof res) == sizeof res, "short report from the child");
    if (res[0] >= 1000) CT_SKIP("a long-term pin (io_uring IORING_REGISTER_BUFFERS) failed in the child: %s",
                                ct_err((int)(res[0] - 1000)));
    CT_CHECK(res[0] == 0, "child's pagemap: %s", ct_err((int)res[0]));
    *entry = (uint64_t)res[1];
    int st = 0;
    CT_CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status 0x%x", st);
    pid = -1;
    if (with_event) {
        CT_CHECK(ct_join(r.th, CT_WAIT_MS) == 0, "FORK reader did not return");
        reading = false;
        CT_CHECK(r.got == 1 && r.m.event == UFFD_EVENT_FORK, "no FORK message (%s, event 0x%x)",
                 r.got == 0 ? "timeout" : ct_err(r.got), r.m.event);
        close((int)r.m.arg.fork.ufd);
    }
out:
    if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    }
    if (reading) ct_join(r.th, CT_WAIT_MS);
    if (p[0] >= 0) close(p[0]);
    if (p[1] >= 0) close(p[1]);
    return rc;
}

// The child's view: with EVENT_FORK the child's VMA stays registered and keeps the uffd-wp bit;
// without it the child has no userfaultfd and the bit is dropped.
static int check_child(struct ct_fix *f, const char *when, bool with_event, bool pin_in_child,
                       char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    uint64_t e = 0;
    CT_TRY(child_entry(f, f->base, with_event, pin_in_child, &e, msg, msglen));
    CT_CHECK(wp_bit(e) == with_event, "%s: the child's pagemap entry 0x%llx has uffd-wp %d, expected %d (%s EVENT_FORK)",
             when, (unsigned long long)e, wp_bit(e), with_event, with_event ? "with" : "without");
out:
    return rc;
}

// A write from a thread that must not block (the page is not protected).
static int write_unprotected(struct ct_fix *f, size_t page, uint8_t v, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct ct_toucher t = {.addr = f->base + page * f->ps, .count = 1, .write = 1, .wval = v};
    int e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "a write to page %zu blocked: it is still protected", page);
    CT_CHECK((uint8_t)f->base[page * f->ps] == v, "the write to page %zu was lost", page);
out:
    return rc;
}

// Protect a populated page; fork; zap it (DONTNEED on shared memory, where the PTE marker keeps
// the bit; PAGEOUT on private memory, where a swap entry would); fork again; unprotect; fault it
// back in.
static int wp_fork(struct ct_fix *f, bool with_event, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    int e = cuffd_register(f->uffd, U(f->base), f->npages * f->ps, UFFDIO_REGISTER_MODE_WP, NULL);
    CT_CHECK(e == 0, "register WP: %s", ct_err(e));
    f->base[0] = 1;
    e = cuffd_writeprotect(f->uffd, U(f->base), f->ps, true, false);
    CT_CHECK(e == 0, "protect: %s", ct_err(e));
    CT_TRY(expect_wp("protected present page", f->base, true, msg, msglen));
    CT_TRY(check_child(f, "present page", with_event, false, msg, msglen));
    if (ct_is_shared_file(f->kind)) {
        CT_CHECK(madvise(f->base, f->ps, MADV_DONTNEED) == 0, "MADV_DONTNEED: %s", ct_err(errno));
    } else {
        // Private memory pages out where it can (anon needs swap, hugetlb cannot): either way
        // the protection must still be there.
        (void)madvise(f->base, f->ps, MADV_PAGEOUT);
    }
    CT_TRY(expect_wp("zapped/paged-out page", f->base, true, msg, msglen));
    CT_TRY(check_child(f, "zapped page", with_event, false, msg, msglen));
    e = cuffd_writeprotect(f->uffd, U(f->base), f->ps, false, false);
    CT_CHECK(e == 0, "unprotect: %s", ct_err(e));
    CT_TRY(expect_wp("unprotected zapped page", f->base, false, msg, msglen));
    CT_TRY(write_unprotected(f, 0, 2, msg, msglen));
    CT_TRY(expect_wp("page faulted back in", f->base, false, msg, msglen));
out:
    return rc;
}

static int t_wp_fork(struct ct_fix *f, char *msg, size_t msglen) { return wp_fork(f, false, msg, msglen); }
static int t_wp_fork_with_event(struct ct_fix *f, char *msg, size_t msglen) { return wp_fork(f, true, msg, msglen); }

// A long-term pinned, protected page across fork (for private memory, fork copies a pinned
// page at once: the early-CoW path must carry the bit), then a pin taken in the child after
// fork (the unshare path). The pin is a write pin (io_uring), so it is taken before the page
// is protected; in the child it is only taken without EVENT_FORK, since a write pin of a
// protected page would wait for the child's (unserved) userfaultfd.
static int wp_fork_pin(struct ct_fix *f, bool with_event, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    int pin = -1;
    int e = cuffd_register(f->uffd, U(f->base), f->ps, UFFDIO_REGISTER_MODE_WP, NULL);
    CT_CHECK(e == 0, "register WP: %s", ct_err(e));
    f->base[0] = 1;
    pin = pin_pages(f->base, f->ps);
    if (pin < 0) CT_SKIP("cannot pin pages long-term here (io_uring IORING_REGISTER_BUFFERS: %s; "
                         "the kernel's gup_test needs CONFIG_GUP_TEST)", ct_err(pin));
    e = cuffd_writeprotect(f->uffd, U(f->base), f->ps, true, false);
    CT_CHECK(e == 0, "protect: %s", ct_err(e));
    CT_TRY(expect_wp("protected pinned page", f->base, true, msg, msglen));
    CT_TRY(check_child(f, "pinned page (early CoW in fork)", with_event, false, msg, msglen));
    CT_TRY(expect_wp("the parent's pinned page after fork", f->base, true, msg, msglen));
    close(pin);
    pin = -1;
    if (!with_event) CT_TRY(check_child(f, "page pinned in the child after fork", false, true, msg, msglen));
    CT_TRY(expect_wp("the parent's page after the child's pin", f->base, true, msg, msglen));
    e = cuffd_writeprotect(f->uffd, U(f->base), f->ps, false, false);
    CT_CHECK(e == 0, "unprotect: %s", ct_err(e));
    CT_TRY(write_unprotected(f, 0, 3, msg, msglen));
out:
    if (pin >= 0) close(pin);
    return rc;
}

static int t_wp_fork_pin(struct ct_fix *f, char *msg, size_t msglen) { return wp_fork_pin(f, false, msg, msglen); }
static int t_wp_fork_pin_with_event(struct ct_fix *f, char *msg, size_t msglen) {
    return wp_fork_pin(f, true, msg, msglen);
}

// MARK: - markers

// Protecting a never-touched page leaves a marker the pagemap shows; unprotecting removes it;
// MADV_DONTNEED drops an anon marker but keeps a file marker (file protection must survive a
// zap, or a later write would go unseen); a write after removal and a read over a marker.
static int t_wp_markers(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    bool anon = f->kind == CUFFD_MEM_ANON;
    int e = cuffd_register(f->uffd, U(f->base), f->npages * f->ps, UFFDIO_REGISTER_MODE_WP, NULL);
    CT_CHECK(e == 0, "register WP: %s", ct_err(e));
    uint64_t pe = 0;
    CT_CHECK(ct_pagemap_entry(f->base, &pe) == 0 && !(pe & CT_PM_PRESENT), "page 0 is populated before the test");
    e = cuffd_writeprotect(f->uffd, U(f->base), f->ps, true, false);
    CT_CHECK(e == 0, "protect an unpopulated page: %s", ct_err(e));
    CT_TRY(expect_wp("marker on an unpopulated page", f->base, true, msg, msglen));
    // A marker is a non-present entry (pagemap reports it in the swap bit, not as present).
    CT_CHECK(ct_pagemap_entry(f->base, &pe) == 0 && !(pe & CT_PM_PRESENT), "protecting populated the page (0x%llx)",
             (unsigned long long)pe);
    e = cuffd_writeprotect(f->uffd, U(f->base), f->ps, false, false);
    CT_CHECK(e == 0, "unprotect a marker: %s", ct_err(e));
    CT_TRY(expect_wp("unprotected marker", f->base, false, msg, msglen));

    e = cuffd_writeprotect(f->uffd, U(f->base), f->ps, true, false);
    CT_CHECK(e == 0, "protect again: %s", ct_err(e));
    CT_CHECK(madvise(f->base, f->ps, MADV_DONTNEED) == 0, "MADV_DONTNEED: %s", ct_err(errno));
    CT_TRY(expect_wp(anon ? "anon marker after MADV_DONTNEED (dropped)" : "file marker after MADV_DONTNEED (kept)",
                     f->base, !anon, msg, msglen));
    if (!anon) {
        e = cuffd_writeprotect(f->uffd, U(f->base), f->ps, false, false);
        CT_CHECK(e == 0, "unprotect the kept marker: %s", ct_err(e));
    }
    // Nothing protects the page now: a write faults it in without a WP fault.
    CT_TRY(write_unprotected(f, 0, 1, msg, msglen));
    CT_TRY(expect_wp("page written after the marker went", f->base, false, msg, msglen));
    CT_CHECK(ct_release(f, 0, 1) == 0, "release page 0: %s", ct_err(errno));

    // A read over a marker maps the page and keeps it protected.
    e = cuffd_writeprotect(f->uffd, U(f->base), f->ps, true, false);
    CT_CHECK(e == 0, "protect: %s", ct_err(e));
    uint8_t v = 0xEE;
    CT_CHECK(ct_touch_catch(f->base + 5, 0, 0, &v, NULL) == 0 && v == 0, "read over a marker: 0x%x", v);
    CT_TRY(expect_wp("page read over a marker", f->base, true, msg, msglen));
    e = cuffd_writeprotect(f->uffd, U(f->base), f->ps, false, false);
    CT_CHECK(e == 0, "unprotect: %s", ct_err(e));
    CT_CHECK(ct_release(f, 0, 1) == 0, "release page 0: %s", ct_err(errno));
out:
    return rc;
}

// Protected populated pages paged out (MADV_PAGEOUT: shmem pages leave the page table even
// without swap) keep the protection: the bit stays, and a write is still a WP fault.
static int t_wp_survives_pageout(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct ct_toucher t = {0};
    bool started = false;
    struct uffd_msg m;
    int e = cuffd_register(f->uffd, U(f->base), f->npages * f->ps, UFFDIO_REGISTER_MODE_WP, NULL);
    CT_CHECK(e == 0, "register WP: %s", ct_err(e));
    for (size_t i = 0; i < f->npages; i++) memcpy(f->base + i * f->ps, f->src + i * f->ps, f->ps);
    e = cuffd_writeprotect(f->uffd, U(f->base), f->npages * f->ps, true, false);
    CT_CHECK(e == 0, "protect: %s", ct_err(e));
    (void)madvise(f->base, f->npages * f->ps, MADV_PAGEOUT); // best effort: hugetlb cannot
    for (size_t i = 0; i < f->npages; i++)
        CT_TRY(expect_wp("protected page after MADV_PAGEOUT", f->base + i * f->ps, true, msg, msglen));
    t = (struct ct_toucher){.addr = f->base + f->ps + 3, .count = 1, .write = 1, .wval = 0x42};
    e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    started = true;
    e = ct_read_msg(f->uffd, &m, CT_WAIT_MS);
    CT_CHECK(e == 1 && m.event == UFFD_EVENT_PAGEFAULT && (m.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) &&
                 (m.arg.pagefault.address & ~(f->ps - 1)) == U(f->base + f->ps),
             "a write to a paged-out protected page was not a WP fault on page 1 (%s, flags 0x%llx)",
             e == 0 ? "timeout" : ct_err(e), (unsigned long long)m.arg.pagefault.flags);
    e = cuffd_writeprotect(f->uffd, U(f->base + f->ps), f->ps, false, false);
    CT_CHECK(e == 0, "unprotect page 1: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "writer not released by unprotect");
    started = false;
    CT_CHECK((uint8_t)f->base[f->ps + 3] == 0x42, "the write was lost");
    f->base[f->ps + 3] = (char)ct_pat(1, 3);
    for (size_t i = 0; i < f->npages; i++)
        CT_CHECK(ct_check_pattern(f->base + i * f->ps, f->ps, i) < 0, "page %zu lost its data in page-out", i);
out:
    (void)started; // a blocked thread dies with the test process
    return rc;
}

// MARK: - the table

CT_CASES(wp_state) = {
    {"wp_fork", t_wp_fork, CT_M_ALL, CT_F_WP, 2,
     "Without EVENT_FORK a forked child's copy of a protected page (present, then zapped) has no uffd-wp bit; unprotect and refault clear it here."},
    {"wp_fork_with_event", t_wp_fork_with_event, CT_M_ALL, CT_F_WP | UFFD_FEATURE_EVENT_FORK, 2,
     "With EVENT_FORK the child's copy of a protected page keeps the uffd-wp bit, present and after a zap."},
    {"wp_fork_pin", t_wp_fork_pin, CT_M_ALL, CT_F_WP, 1,
     "A long-term pinned protected page across fork (early CoW) and a pin taken in the child: no stale uffd-wp bit in the child, the parent keeps its own."},
    {"wp_fork_pin_with_event", t_wp_fork_pin_with_event, CT_M_ALL, CT_F_WP | UFFD_FEATURE_EVENT_FORK, 1,
     "A long-term pinned protected page across fork with EVENT_FORK: the early-CoW copy in the child keeps the uffd-wp bit."},
    {"wp_markers", t_wp_markers, CT_M_ALL, CT_F_WP | UFFD_FEATURE_WP_UNPOPULATED, 2,
     "Markers: protecting an unpopulated page sets the pagemap bit, unprotect clears it, DONTNEED drops an anon marker and keeps a file one, a read over a marker stays protected."},
    {"wp_survives_pageout", t_wp_survives_pageout, CT_M_ALL, CT_F_WP, 2,
     "Protected pages after MADV_PAGEOUT keep the uffd-wp bit and a write is still a WP fault, data intact."},
    CT_END,
};
