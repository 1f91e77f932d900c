// The filling verbs: COPY, ZEROPAGE, CONTINUE, POISON, with exact ranges, EEXIST on repeat,
// and the done count on partial progress.
#include "ct.h"

#include <linux/mman.h> // MADV_COLLAPSE: the kernel's header has it, glibc's <sys/mman.h> not yet
#include <sys/mman.h>
#include <unistd.h>

#define U(p) ((uint64_t)(uintptr_t)(p))

// Pages [0, n) other than those in `filled` (a bit mask) are not mapped.
static int check_missing(struct ct_fix *f, unsigned filled, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    for (size_t i = 0; i < f->npages; i++) {
        int pr = ct_present(f->base + i * f->ps);
        CT_CHECK(pr >= 0, "pagemap: %s", ct_err(pr));
        CT_CHECK(pr == (int)((filled >> i) & 1), "%s: page %zu is %s, expected %s",
                 ct_kind_name(f->kind), i, pr ? "mapped" : "missing",
                 (filled >> i) & 1 ? "mapped" : "missing");
    }
out:
    return rc;
}

static int t_copy(struct ct_fix *f, char *msg, size_t msglen) {
    int kind = f->kind;
    int rc = CUFFD_TEST_PASS;
    int64_t done = -1;
    struct uffd_msg m;
    struct ct_toucher t = {0};
    int e = cuffd_register(f->uffd, U(f->base), f->ps * 4, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    e = cuffd_copy(f->uffd, U(f->base + f->ps), U(f->src + f->ps), f->ps, 0, &done);
    CT_CHECK(e == 0 && done == (int64_t)f->ps, "COPY page 1: %s, done %lld", ct_err(e), (long long)done);
    CT_CHECK(ct_check_pattern(f->base + f->ps, f->ps, 1) < 0, "page 1 does not hold the copied data");
    CT_TRY(check_missing(f, 1u << 1, msg, msglen));
    if (ct_is_shared_file(kind))
        CT_CHECK(ct_check_pattern(f->alias + f->ps, f->ps, 1) < 0, "the shared file does not hold the copy");
    if (ct_is_private_file(kind))
        CT_CHECK(ct_check_zero(f->alias + f->ps, f->ps) < 0,
                 "COPY into private shmem must not write the file");
    e = cuffd_copy(f->uffd, U(f->base + f->ps), U(f->src), f->ps, 0, &done);
    CT_CHECK(e == -EEXIST && done == 0, "second COPY of page 1: %s, done %lld (expected EEXIST, 0)",
             ct_err(e), (long long)done);
    CT_CHECK(ct_check_pattern(f->base + f->ps, f->ps, 1) < 0, "second COPY changed page 1");
    // A neighbour is still missing: touching it faults and reaches us.
    t = (struct ct_toucher){.addr = f->base + 2 * f->ps, .count = 1};
    e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    e = ct_read_msg(f->uffd, &m, CT_WAIT_MS);
    CT_CHECK(e == 1, "no fault for neighbour page 2 (%s)", e == 0 ? "timeout" : ct_err(e));
    CT_CHECK(m.event == UFFD_EVENT_PAGEFAULT &&
                 (m.arg.pagefault.address & ~(f->ps - 1)) == U(f->base + 2 * f->ps),
             "unexpected message: event %u address 0x%llx", m.event,
             (unsigned long long)m.arg.pagefault.address);
    e = cuffd_copy(f->uffd, U(f->base + 2 * f->ps), U(f->src + 2 * f->ps), f->ps, 0, &done);
    CT_CHECK(e == 0, "COPY page 2: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "faulting thread not woken by COPY");
    CT_CHECK(ct_check_pattern(f->base + 2 * f->ps, f->ps, 2) < 0, "page 2 does not hold the copied data");
    CT_TRY(check_missing(f, 0x6, msg, msglen));
out:
    return rc;
}

static int t_copy_partial(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    int64_t done = -1;
    int e = cuffd_register(f->uffd, U(f->base), f->ps * 4, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    e = cuffd_copy(f->uffd, U(f->base + 2 * f->ps), U(f->src + 2 * f->ps), f->ps, 0, &done);
    CT_CHECK(e == 0, "COPY page 2: %s", ct_err(e));
    // Pages 0,1 go in, page 2 exists: the kernel reports 2 pages done (EAGAIN), the core
    // continues at page 2 and gets EEXIST, with done counting the two pages.
    e = cuffd_copy(f->uffd, U(f->base), U(f->src), f->ps * 4, 0, &done);
    CT_CHECK(e == -EEXIST, "COPY of 4 pages over a populated page 2: %s (expected EEXIST)", ct_err(e));
    CT_CHECK(done == (int64_t)(2 * f->ps), "done %lld, expected %llu", (long long)done,
             (unsigned long long)(2 * f->ps));
    CT_CHECK(ct_check_pattern(f->base, f->ps, 0) < 0 && ct_check_pattern(f->base + f->ps, f->ps, 1) < 0,
             "pages 0-1 do not hold the data");
    CT_TRY(check_missing(f, 0x7, msg, msglen));
    e = cuffd_copy(f->uffd, U(f->base + 3 * f->ps), U(f->src + 3 * f->ps), f->ps, 0, &done);
    CT_CHECK(e == 0 && done == (int64_t)f->ps, "COPY of the rest from dst+done: %s", ct_err(e));
    // Nothing to do with len 0, and a misaligned dst is refused with nothing done.
    e = cuffd_copy(f->uffd, U(f->base), U(f->src), 0, 0, &done);
    CT_CHECK(e == -EINVAL && done == 0, "COPY len 0: %s done %lld", ct_err(e), (long long)done);
    e = cuffd_copy(f->uffd, U(f->base) + 1, U(f->src), f->ps, 0, &done);
    CT_CHECK(e == -EINVAL && done == 0, "COPY misaligned: %s done %lld", ct_err(e), (long long)done);
out:
    return rc;
}

static int t_copy_fault(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct ct_handler h;
    bool hstarted = false;
    const size_t n = 8;
    int e = cuffd_register(f->uffd, U(f->base), f->ps * n, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    e = ct_handler_start(&h, f, CT_H_COPY);
    CT_CHECK(e == 0, "handler thread: %s", ct_err(e));
    hstarted = true;
    struct ct_toucher t = {.addr = f->base, .count = n, .stride = f->ps};
    e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "reader still blocked after %d ms (%zu of %zu pages)",
             CT_WAIT_MS, t.touched, n);
    hstarted = false;
    CT_CHECK(ct_handler_stop(&h) == 0, "handler did not stop");
    CT_CHECK(atomic_load(&h.errors) == 0, "handler: %d failed resolutions, first %s",
             atomic_load(&h.errors), ct_err(h.first_err));
    int all = ct_handler_faults(&h, 0, 0);
    int missing = ct_handler_faults(&h, 0, UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR |
                                               UFFD_PAGEFAULT_FLAG_WRITE);
    CT_CHECK(all == (int)n && missing == (int)n,
             "%d faults (%d read MISSING) for %zu pages; expected one read MISSING fault per page",
             all, missing, n);
    for (size_t i = 0; i < n; i++)
        CT_CHECK(ct_check_pattern(f->base + i * f->ps, f->ps, i) < 0, "page %zu wrong after fault", i);
out:
    if (hstarted) ct_handler_stop(&h);
    return rc;
}

static int t_zeropage(struct ct_fix *f, char *msg, size_t msglen) {
    int kind = f->kind;
    int rc = CUFFD_TEST_PASS;
    int64_t done = -1;
    uint64_t io = 0;
    int e = cuffd_register(f->uffd, U(f->base), f->ps * 4, UFFDIO_REGISTER_MODE_MISSING, &io);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    if (ct_is_hugetlb(kind)) {
        // hugetlb has no zero page: the range says so, and the ioctl refuses.
        CT_CHECK(!(io & (1ull << _UFFDIO_ZEROPAGE)), "hugetlb range offers ZEROPAGE");
        e = cuffd_zeropage(f->uffd, U(f->base), f->ps, 0, &done);
        CT_CHECK(e == -EINVAL && done == 0, "ZEROPAGE on hugetlb: %s (expected EINVAL)", ct_err(e));
        goto out;
    }
    e = cuffd_zeropage(f->uffd, U(f->base + f->ps), f->ps, 0, &done);
    CT_CHECK(e == 0 && done == (int64_t)f->ps, "ZEROPAGE page 1: %s, done %lld", ct_err(e),
             (long long)done);
    CT_CHECK(ct_check_zero(f->base + f->ps, f->ps) < 0, "page 1 is not zero");
    CT_TRY(check_missing(f, 1u << 1, msg, msglen));
    e = cuffd_zeropage(f->uffd, U(f->base + f->ps), f->ps, 0, &done);
    CT_CHECK(e == -EEXIST && done == 0, "second ZEROPAGE: %s, done %lld (expected EEXIST, 0)",
             ct_err(e), (long long)done);
    e = cuffd_copy(f->uffd, U(f->base + f->ps), U(f->src), f->ps, 0, &done);
    CT_CHECK(e == -EEXIST, "COPY over a zero page: %s (expected EEXIST)", ct_err(e));
    // Partial: pages 2..3 over a populated page 3.
    e = cuffd_zeropage(f->uffd, U(f->base + 3 * f->ps), f->ps, 0, &done);
    CT_CHECK(e == 0, "ZEROPAGE page 3: %s", ct_err(e));
    e = cuffd_zeropage(f->uffd, U(f->base + 2 * f->ps), 2 * f->ps, 0, &done);
    CT_CHECK(e == -EEXIST && done == (int64_t)f->ps, "ZEROPAGE 2..3 over page 3: %s, done %lld",
             ct_err(e), (long long)done);
    CT_TRY(check_missing(f, 0xE, msg, msglen));
    // A zero-page mapping is writable like any other (anon: CoW from the shared zero page).
    f->base[f->ps + 5] = 9;
    CT_CHECK(f->base[f->ps + 5] == 9, "write to a zero-filled page lost");
out:
    return rc;
}

static int t_continue(struct ct_fix *f, char *msg, size_t msglen) {
    int kind = f->kind;
    int rc = CUFFD_TEST_PASS;
    if (kind == CUFFD_MEM_ANON) {
        snprintf(msg, msglen, "CONTINUE (minor faults) applies to shmem and hugetlb only");
        return CUFFD_TEST_SKIP;
    }
    struct ct_handler h;
    bool hstarted = false;
    const size_t n = 4;
    int64_t done = -1;
    uint64_t io = 0;
    // The page cache is filled through the second view; the registered view has no PTEs yet.
    for (size_t i = 0; i < n; i++) memcpy(f->alias + i * f->ps, f->src + i * f->ps, f->ps);
    int e = cuffd_register(f->uffd, U(f->base), f->ps * n, UFFDIO_REGISTER_MODE_MINOR, &io);
    CT_CHECK(e == 0, "register MINOR: %s", ct_err(e));
    CT_CHECK(io & (1ull << _UFFDIO_CONTINUE), "MINOR range lacks CONTINUE (ioctls 0x%llx)",
             (unsigned long long)io);
    e = ct_handler_start(&h, f, CT_H_CONTINUE);
    CT_CHECK(e == 0, "handler thread: %s", ct_err(e));
    hstarted = true;
    struct ct_toucher t = {.addr = f->base, .count = n, .stride = f->ps};
    e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "reader still blocked (%zu of %zu pages)", t.touched, n);
    hstarted = false;
    CT_CHECK(ct_handler_stop(&h) == 0, "handler did not stop");
    CT_CHECK(atomic_load(&h.errors) == 0, "CONTINUE failed: %s", ct_err(h.first_err));
    int minor = ct_handler_faults(&h, UFFD_PAGEFAULT_FLAG_MINOR, 0);
    int all = ct_handler_faults(&h, 0, 0);
    CT_CHECK(minor == (int)n && all == (int)n, "%d minor faults (%d faults) for %zu pages, expected %zu",
             minor, all, n, n);
    for (size_t i = 0; i < n; i++)
        CT_CHECK(ct_check_pattern(f->base + i * f->ps, f->ps, i) < 0, "page %zu does not show the page cache", i);
    e = cuffd_continue(f->uffd, U(f->base), f->ps, 0, &done);
    CT_CHECK(e == -EEXIST && done == 0, "second CONTINUE: %s, done %lld (expected EEXIST, 0)",
             ct_err(e), (long long)done);
    // The mapping is of the page cache itself (shared) or copy-on-write (private).
    f->alias[3] = 0x55;
    if (ct_is_private_file(kind)) {
        f->base[f->ps + 1] = 0x66;
        CT_CHECK((uint8_t)f->alias[f->ps + 1] == ct_pat(1, 1), "private write reached the file");
    } else {
        CT_CHECK((uint8_t)f->base[3] == 0x55, "CONTINUE did not map the page cache page");
    }
out:
    if (hstarted) ct_handler_stop(&h);
    return rc;
}

static int t_poison(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    int64_t done = -1;
    uint8_t v = 0;
    void *fa = NULL;
    int e = cuffd_register(f->uffd, U(f->base), f->ps * 3, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    e = cuffd_poison(f->uffd, U(f->base + f->ps), f->ps, 0, &done);
    CT_CHECK(e == 0 && done == (int64_t)f->ps, "POISON page 1: %s, done %lld", ct_err(e), (long long)done);
    e = cuffd_poison(f->uffd, U(f->base + f->ps), f->ps, 0, &done);
    CT_CHECK(e == -EEXIST && done == 0, "second POISON: %s (expected EEXIST)", ct_err(e));
    e = cuffd_copy(f->uffd, U(f->base), U(f->src), f->ps, 0, &done);
    CT_CHECK(e == 0, "COPY page 0: %s", ct_err(e));
    e = cuffd_copy(f->uffd, U(f->base + 2 * f->ps), U(f->src + 2 * f->ps), f->ps, 0, &done);
    CT_CHECK(e == 0, "COPY page 2: %s", ct_err(e));
    // This test runs in its own process (the runner's child): the SIGBUS is caught here.
    int sig = ct_touch_catch(f->base + f->ps + 100, 0, 0, &v, &fa);
    CT_CHECK(sig == 1, "reading a poisoned page did not raise SIGBUS (read 0x%x)", v);
    CT_CHECK((uintptr_t)fa >= U(f->base + f->ps) && (uintptr_t)fa < U(f->base + 2 * f->ps),
             "SIGBUS address %p is outside the poisoned page %p", fa, (void *)(f->base + f->ps));
    sig = ct_touch_catch(f->base + f->ps, 1, 1, NULL, &fa);
    CT_CHECK(sig == 1, "writing a poisoned page did not raise SIGBUS");
    sig = ct_touch_catch(f->base + 7, 0, 0, &v, &fa);
    CT_CHECK(sig == 0 && v == ct_pat(0, 7), "neighbour page 0: sigbus %d value 0x%x", sig, v);
    sig = ct_touch_catch(f->base + 2 * f->ps + 7, 1, 0x42, NULL, &fa);
    CT_CHECK(sig == 0 && (uint8_t)f->base[2 * f->ps + 7] == 0x42, "neighbour page 2 not writable");
    // The poison marker counts as an empty PTE for COPY (pte_none_mostly): a later COPY
    // replaces it and the page works again.
    e = cuffd_copy(f->uffd, U(f->base + f->ps), U(f->src + f->ps), f->ps, 0, &done);
    CT_CHECK(e == 0, "COPY over a poisoned page: %s (expected it to replace the marker)", ct_err(e));
    sig = ct_touch_catch(f->base + f->ps + 100, 0, 0, &v, &fa);
    CT_CHECK(sig == 0 && v == ct_pat(1, 100), "page 1 after COPY over poison: sigbus %d value 0x%x", sig, v);
out:
    return rc;
}

// COPY with DONTWAKE leaves the faulting thread asleep until UFFDIO_WAKE.
static int t_copy_dontwake_wake(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct uffd_msg m;
    int64_t done;
    int e = cuffd_register(f->uffd, U(f->base), 2 * f->ps, UFFDIO_REGISTER_MODE_MISSING, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    struct ct_toucher t = {.addr = f->base + f->ps + 9, .count = 1};
    e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    e = ct_read_msg(f->uffd, &m, CT_WAIT_MS);
    CT_CHECK(e == 1 && m.event == UFFD_EVENT_PAGEFAULT, "no fault (%s)", ct_err(e));
    e = cuffd_copy(f->uffd, U(f->base + f->ps), U(f->src + f->ps), f->ps, UFFDIO_COPY_MODE_DONTWAKE, &done);
    CT_CHECK(e == 0 && done == (int64_t)f->ps, "COPY DONTWAKE: %s", ct_err(e));
    usleep(50000);
    CT_CHECK(!atomic_load(&t.finished), "COPY with DONTWAKE woke the faulting thread");
    // A wake of another page does not release it; a wake of its page does.
    e = cuffd_wake(f->uffd, U(f->base), f->ps);
    CT_CHECK(e == 0, "WAKE page 0: %s", ct_err(e));
    usleep(50000);
    CT_CHECK(!atomic_load(&t.finished), "WAKE of page 0 released a thread waiting on page 1");
    e = cuffd_wake(f->uffd, U(f->base + f->ps), f->ps);
    CT_CHECK(e == 0, "WAKE page 1: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "WAKE did not release the faulting thread");
    CT_CHECK(t.sum == ct_pat(1, 9), "the woken thread read 0x%llx, expected 0x%x", (unsigned long long)t.sum,
             ct_pat(1, 9));
    CT_CHECK(ct_read_msg(f->uffd, &m, 0) == 0, "the woken thread faulted again");
out:
    return rc;
}

// COPY (and CONTINUE) with MODE_WP map the page write-protected: a write then is a WP fault.
static int t_copy_mode_wp(struct ct_fix *f, char *msg, size_t msglen) {
    int kind = f->kind;
    int rc = CUFFD_TEST_PASS;
    bool minor = kind != CUFFD_MEM_ANON;
    struct uffd_msg m;
    int64_t done;
    struct ct_toucher t = {0};
    uint64_t modes = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP | (minor ? UFFDIO_REGISTER_MODE_MINOR : 0);
    if (minor) memcpy(f->alias + f->ps, f->src + f->ps, f->ps); // page 1 is in the page cache
    int e = cuffd_register(f->uffd, U(f->base), 2 * f->ps, modes, NULL);
    CT_CHECK(e == 0, "register: %s", ct_err(e));
    e = cuffd_copy(f->uffd, U(f->base), U(f->src), f->ps, UFFDIO_COPY_MODE_WP, &done);
    CT_CHECK(e == 0, "COPY MODE_WP: %s", ct_err(e));
    if (minor) {
        e = cuffd_continue(f->uffd, U(f->base + f->ps), f->ps, UFFDIO_CONTINUE_MODE_WP, &done);
        CT_CHECK(e == 0, "CONTINUE MODE_WP: %s", ct_err(e));
    }
    int pages = minor ? 2 : 1;
    for (int i = 0; i < pages; i++) {
        CT_CHECK(ct_check_pattern(f->base + (size_t)i * f->ps, f->ps, (size_t)i) < 0, "page %d data wrong", i);
        t = (struct ct_toucher){.addr = f->base + (size_t)i * f->ps, .count = 1, .write = 1, .wval = 0x3C};
        e = ct_touch_start(&t);
        CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
        e = ct_read_msg(f->uffd, &m, CT_WAIT_MS);
        CT_CHECK(e == 1 && m.event == UFFD_EVENT_PAGEFAULT, "page %d: no fault for a write to a page mapped with MODE_WP (%s)",
                 i, e == 0 ? "timeout" : ct_err(e));
        CT_CHECK((m.arg.pagefault.flags & (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_WRITE)) ==
                     (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_WRITE),
                 "page %d: fault flags 0x%llx, expected WRITE|WP", i, (unsigned long long)m.arg.pagefault.flags);
        e = cuffd_writeprotect(f->uffd, U(f->base + (size_t)i * f->ps), f->ps, false, false);
        CT_CHECK(e == 0, "unprotect: %s", ct_err(e));
        CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "writer not released by unprotect");
        CT_CHECK((uint8_t)f->base[(size_t)i * f->ps] == 0x3C, "page %d: write lost", i);
    }
out:
    return rc;
}

// MINOR faults on shmem answered by CONTINUE, then MADV_COLLAPSE of the registered view into
// huge pages: it maps them by PMD there, the data survives, and reading raises no new fault.
static int t_minor_collapse(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct ct_handler h;
    bool hstarted = false;
    const uint64_t pmd = 2u << 20, len = f->npages * f->ps;
    // The fixture's view is not PMD-aligned: map the file again at an aligned address.
    char *al = cuffd_map_anon_aligned(len, pmd);
    CT_CHECK(al, "aligned reservation: %s", ct_err(errno));
    CT_CHECK(mmap(al, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, f->r.memfd, 0) == al,
             "mmap the memfd at the aligned address: %s", ct_err(errno));
    munmap(f->base, len);
    f->base = f->r.addr = al;
    int e = cuffd_register(f->uffd, U(f->base), len, UFFDIO_REGISTER_MODE_MINOR, NULL);
    CT_CHECK(e == 0, "register MINOR: %s", ct_err(e));
    // Filling the file through the other view raises nothing; the registered view faults MINOR.
    for (size_t i = 0; i < f->npages; i++) memcpy(f->alias + i * f->ps, f->src + i * f->ps, f->ps);
    e = ct_handler_start(&h, f, CT_H_CONTINUE);
    CT_CHECK(e == 0, "handler: %s", ct_err(e));
    hstarted = true;
    struct ct_toucher t = {.addr = f->base, .count = f->npages, .stride = f->ps};
    e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "reader blocked (%zu of %zu pages)", t.touched, f->npages);
    int faults = atomic_load(&h.nlog);
    // The handler logs the first CT_MAX_LOG messages: every logged one must be MINOR.
    int logged = faults < CT_MAX_LOG ? faults : CT_MAX_LOG;
    CT_CHECK(faults == (int)f->npages && ct_handler_faults(&h, UFFD_PAGEFAULT_FLAG_MINOR, 0) == logged,
             "%d messages (%d of the %d logged MINOR), expected %zu MINOR faults", faults,
             ct_handler_faults(&h, UFFD_PAGEFAULT_FLAG_MINOR, 0), logged, f->npages);
    CT_CHECK(atomic_load(&h.errors) == 0, "CONTINUE failed: %s", ct_err(h.first_err));
    if (madvise(f->base, len, MADV_COLLAPSE) != 0) {
        int err = errno;
        char knob[64] = "?";
        FILE *k = fopen("/sys/kernel/mm/transparent_hugepage/shmem_enabled", "re");
        if (k) {
            if (!fgets(knob, sizeof knob, k)) knob[0] = 0;
            fclose(k);
            knob[strcspn(knob, "\n")] = 0;
        }
        CT_SKIP("MADV_COLLAPSE on shmem failed here: %s (transparent_hugepage/shmem_enabled: %s)",
                ct_err(err), knob);
    }
    long pmd_kb = ct_smaps_kb(f->base, "ShmemPmdMapped");
    CT_CHECK(pmd_kb >= (long)(pmd >> 10), "after MADV_COLLAPSE the registered view has ShmemPmdMapped %ld kB", pmd_kb);
    for (size_t i = 0; i < f->npages; i++) {
        CT_CHECK(ct_check_pattern(f->base + i * f->ps, f->ps, i) < 0, "page %zu corrupt after collapse", i);
        CT_CHECK(ct_check_pattern(f->alias + i * f->ps, f->ps, i) < 0, "page %zu corrupt in the file", i);
    }
    CT_CHECK(atomic_load(&h.nlog) == faults, "reading the collapsed view raised %d new faults",
             atomic_load(&h.nlog) - faults);
out:
    if (hstarted) ct_handler_stop(&h);
    return rc;
}

// MARK: - the table

CT_CASES(fill) = {
    {"copy", t_copy, CT_M_ALL, 0, 4,
     "COPY fills exactly its range (file pages for shmem, private pages for shmem-private); a repeat is EEXIST with 0 done."},
    {"copy_partial", t_copy_partial, CT_M_ALL, 0, 4,
     "COPY over a populated page stops there: EEXIST with done = the pages before it; len 0 and misaligned are EINVAL."},
    {"copy_fault", t_copy_fault, CT_M_ALL, 0, 8,
     "Missing faults on every page, resolved by a COPY handler: each page faults once and holds its data."},
    {"copy_dontwake_wake", t_copy_dontwake_wake, CT_M_ALL, 0, 2,
     "COPY with DONTWAKE leaves the thread asleep; UFFDIO_WAKE of its page (not another) releases it."},
    {"copy_mode_wp", t_copy_mode_wp, CT_M_ALL, CT_F_WP | CT_F_MINOR, 2,
     "COPY_MODE_WP (and CONTINUE_MODE_WP on shmem/hugetlb) map the page protected: a write is a WP fault."},
    {"zeropage", t_zeropage, CT_M_ALL, 0, 4,
     "ZEROPAGE maps zero pages (a repeat is EEXIST); hugetlb has no zero page: the range lacks ZEROPAGE and the ioctl gives EINVAL."},
    {"continue", t_continue, CT_M_FILES, CT_F_MINOR, 4,
     "CONTINUE maps page-cache pages filled through the alias; a repeat is EEXIST."},
    {"minor_collapse", t_minor_collapse, CT_M_SHMEM, CT_F_MINOR, 512,
     "MINOR faults on shmem answered by CONTINUE, then MADV_COLLAPSE maps the registered view by PMD: data intact, no new fault."},
    {"poison", t_poison, CT_M_ALL, UFFD_FEATURE_POISON, 3,
     "POISON marks pages: an access raises SIGBUS; a repeat is EEXIST."},
    CT_END,
};
