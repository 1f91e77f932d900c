// Write-protect: protect/unprotect with WP faults, WP on unpopulated anon PTEs (markers), and
// WP_ASYNC dirty tracking read back with PAGEMAP_SCAN.
#include "ct.h"

#include <unistd.h>

#define U(p) ((uint64_t)(uintptr_t)(p))

// Touches pages [first, first+count) of the fixture in a thread and waits for it.
static int touch(struct ct_fix *f, size_t first, size_t count, int write, uint8_t v, char *msg,
                 size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct ct_toucher t = {.addr = f->base + first * f->ps, .count = count, .stride = f->ps,
                           .write = write, .wval = v};
    int e = ct_touch_start(&t);
    CT_CHECK(e == 0, "pthread_create: %s", ct_err(e));
    CT_CHECK(ct_touch_join(&t, CT_WAIT_MS) == 0, "%s of pages %zu..%zu still blocked after %d ms",
             write ? "write" : "read", first, first + count - 1, CT_WAIT_MS);
out:
    return rc;
}

static int t_wp(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct ct_handler h;
    bool hstarted = false;
    memcpy(f->base, f->src, 4 * f->ps); // populated before registration
    uint64_t io = 0;
    int e = cuffd_register(f->uffd, U(f->base), 4 * f->ps, UFFDIO_REGISTER_MODE_WP, &io);
    CT_CHECK(e == 0, "register WP: %s", ct_err(e));
    CT_CHECK(io & (1ull << _UFFDIO_WRITEPROTECT), "WP range lacks WRITEPROTECT");
    e = cuffd_writeprotect(f->uffd, U(f->base), 4 * f->ps, true, false);
    CT_CHECK(e == 0, "protect: %s", ct_err(e));
    e = ct_handler_start(&h, f, CT_H_UNPROTECT);
    CT_CHECK(e == 0, "handler: %s", ct_err(e));
    hstarted = true;
    // Reads of protected pages do not fault.
    CT_TRY(touch(f, 0, 4, 0, 0, msg, msglen));
    CT_CHECK(atomic_load(&h.nlog) == 0, "reading protected pages gave %d messages", atomic_load(&h.nlog));
    // Writes do, once per page, with WRITE|WP; the handler unprotects.
    CT_TRY(touch(f, 1, 2, 1, 0xA1, msg, msglen));
    CT_CHECK(ct_handler_wait(&h, 2, 100), "expected 2 WP faults, got %d", atomic_load(&h.nlog));
    int wpf = ct_handler_faults(&h, UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_WRITE, UFFD_PAGEFAULT_FLAG_MINOR);
    CT_CHECK(wpf == 2 && atomic_load(&h.nlog) == 2, "%d WRITE|WP faults of %d messages, expected 2 of 2",
             wpf, atomic_load(&h.nlog));
    CT_CHECK((uint8_t)f->base[f->ps] == 0xA1 && (uint8_t)f->base[2 * f->ps] == 0xA1, "writes lost");
    CT_CHECK((uint8_t)f->base[f->ps + 1] == ct_pat(1, 1), "WP fault changed the page's data");
    // Unprotect without a fault: the next write does not fault.
    e = cuffd_writeprotect(f->uffd, U(f->base + 3 * f->ps), f->ps, false, false);
    CT_CHECK(e == 0, "unprotect: %s", ct_err(e));
    CT_TRY(touch(f, 3, 1, 1, 0xB2, msg, msglen));
    CT_CHECK(atomic_load(&h.nlog) == 2, "write to an unprotected page faulted");
    // Page 0 is still protected; page 1 can be protected again.
    e = cuffd_writeprotect(f->uffd, U(f->base + f->ps), f->ps, true, false);
    CT_CHECK(e == 0, "re-protect: %s", ct_err(e));
    CT_TRY(touch(f, 0, 2, 1, 0xC3, msg, msglen));
    CT_CHECK(ct_handler_wait(&h, 4, 100) && atomic_load(&h.nlog) == 4,
             "pages 0 (still protected) and 1 (re-protected): %d messages in all, expected 4",
             atomic_load(&h.nlog));
    CT_CHECK(atomic_load(&h.errors) == 0, "unprotect in handler failed: %s", ct_err(h.first_err));
out:
    if (hstarted) ct_handler_stop(&h);
    return rc;
}

static int t_wp_unpopulated(struct ct_fix *f, char *msg, size_t msglen) {
    int kind = f->kind;
    int rc = CUFFD_TEST_PASS;
    struct ct_handler h;
    bool hstarted = false;
    if (kind != CUFFD_MEM_ANON) {
        snprintf(msg, msglen, "WP_UNPOPULATED is about anonymous memory (file memory always has markers)");
        return CUFFD_TEST_SKIP;
    }
    int e = cuffd_register(f->uffd, U(f->base), 4 * f->ps, UFFDIO_REGISTER_MODE_WP, NULL);
    CT_CHECK(e == 0, "register WP: %s", ct_err(e));
    e = cuffd_writeprotect(f->uffd, U(f->base), 4 * f->ps, true, false);
    CT_CHECK(e == 0, "protect empty range: %s", ct_err(e));
    e = ct_handler_start(&h, f, CT_H_UNPROTECT);
    CT_CHECK(e == 0, "handler: %s", ct_err(e));
    hstarted = true;
    // Writes to never-touched pages are WP faults (the marker), not plain missing pages.
    CT_TRY(touch(f, 0, 2, 1, 0x5A, msg, msglen));
    CT_CHECK(ct_handler_wait(&h, 2, 100), "no WP fault for writes to empty protected pages");
    int wpf = ct_handler_faults(&h, UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_WRITE, 0);
    CT_CHECK(wpf == 2 && atomic_load(&h.nlog) == 2, "%d WRITE|WP faults of %d messages, expected 2",
             wpf, atomic_load(&h.nlog));
    CT_CHECK(f->base[0] == 0x5A && f->base[f->ps] == 0x5A, "writes lost");
    // A read maps the zero page and keeps the protection: the following write faults.
    CT_TRY(touch(f, 2, 1, 0, 0, msg, msglen));
    CT_CHECK(atomic_load(&h.nlog) == 2, "a read of an empty protected page faulted");
    CT_TRY(touch(f, 2, 1, 1, 0x6B, msg, msglen));
    CT_CHECK(ct_handler_wait(&h, 3, 100) && ct_handler_faults(&h, UFFD_PAGEFAULT_FLAG_WP, 0) == 3,
             "write after read of a protected empty page: %d messages, expected a third WP fault",
             atomic_load(&h.nlog));
    CT_CHECK(atomic_load(&h.errors) == 0, "unprotect in handler failed: %s", ct_err(h.first_err));
out:
    if (hstarted) ct_handler_stop(&h);
    return rc;
}

// Scans [base, base + n pages) for written pages; fills a bit mask of page indexes.
static int scan(struct ct_fix *f, int pm, bool reprotect, uint32_t *mask, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    struct page_region v[16];
    uint64_t walk_end = 0, start = U(f->base), end = start + f->npages * f->ps;
    *mask = 0;
    int n = cuffd_pagemap_scan_written(pm, start, end, reprotect, v, 16, &walk_end);
    CT_CHECK(n >= 0, "PAGEMAP_SCAN: %s", ct_err(n));
    CT_CHECK(walk_end == end, "PAGEMAP_SCAN stopped at +0x%llx of 0x%llx",
             (unsigned long long)(walk_end - start), (unsigned long long)(end - start));
    for (int i = 0; i < n; i++) {
        CT_CHECK(v[i].categories & PAGE_IS_WRITTEN, "region %d without PAGE_IS_WRITTEN", i);
        CT_CHECK(v[i].start >= start && v[i].end <= end && v[i].start < v[i].end &&
                     (v[i].start - start) % f->ps == 0 && (v[i].end - start) % f->ps == 0,
                 "region %d [+0x%llx, +0x%llx) is odd", i, (unsigned long long)(v[i].start - start),
                 (unsigned long long)(v[i].end - start));
        for (uint64_t a = v[i].start; a < v[i].end; a += f->ps) *mask |= 1u << ((a - start) / f->ps);
    }
out:
    return rc;
}

static int t_wp_async_scan(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    int pm = -1;
    uint32_t mask = 0;
    struct uffd_msg m;
    memcpy(f->base, f->src, 8 * f->ps);
    int e = cuffd_register(f->uffd, U(f->base), 8 * f->ps, UFFDIO_REGISTER_MODE_WP, NULL);
    CT_CHECK(e == 0, "register WP: %s", ct_err(e));
    e = cuffd_writeprotect(f->uffd, U(f->base), 8 * f->ps, true, false);
    CT_CHECK(e == 0, "protect: %s", ct_err(e));
    pm = cuffd_pagemap_open();
    CT_CHECK(pm >= 0, "open pagemap: %s", ct_err(pm));
    CT_TRY(scan(f, pm, false, &mask, msg, msglen));
    CT_CHECK(mask == 0, "right after protecting, pages 0x%x reported written", mask);
    // The kernel resolves these write faults itself: no thread answers them.
    CT_TRY(touch(f, 1, 1, 1, 0x11, msg, msglen));
    CT_TRY(touch(f, 3, 2, 1, 0x22, msg, msglen));
    CT_CHECK(ct_read_msg(f->uffd, &m, 0) == 0, "WP_ASYNC write queued a message (event %u)", m.event);
    CT_TRY(scan(f, pm, true, &mask, msg, msglen));
    CT_CHECK(mask == 0x1A, "written pages reported 0x%x, expected 0x1a (pages 1, 3, 4)", mask);
    CT_TRY(scan(f, pm, false, &mask, msg, msglen));
    CT_CHECK(mask == 0, "after the re-protecting scan, pages 0x%x still reported written", mask);
    CT_TRY(touch(f, 6, 1, 1, 0x33, msg, msglen));
    CT_TRY(scan(f, pm, true, &mask, msg, msglen));
    CT_CHECK(mask == 0x40, "after writing page 6: 0x%x reported, expected 0x40", mask);
    // A one-entry vector: each call returns one region and walk_end says where to go on; the
    // re-protect covers only what was reported, so nothing is lost between calls.
    CT_TRY(touch(f, 0, 1, 1, 0x44, msg, msglen));
    CT_TRY(touch(f, 2, 1, 1, 0x44, msg, msglen));
    CT_TRY(touch(f, 5, 1, 1, 0x44, msg, msglen));
    {
        uint64_t from = U(f->base), end = U(f->base) + 8 * f->ps;
        int calls = 0;
        mask = 0;
        while (from < end && calls < 20) {
            struct page_region v[1];
            uint64_t walk_end = 0;
            int n = cuffd_pagemap_scan_written(pm, from, end, true, v, 1, &walk_end);
            CT_CHECK(n >= 0 && n <= 1, "PAGEMAP_SCAN with one entry: %d", n);
            CT_CHECK(walk_end > from && walk_end <= end, "walk_end +0x%llx does not advance from +0x%llx",
                     (unsigned long long)(walk_end - U(f->base)), (unsigned long long)(from - U(f->base)));
            for (int i = 0; i < n; i++)
                for (uint64_t a = v[i].start; a < v[i].end; a += f->ps) mask |= 1u << ((a - U(f->base)) / f->ps);
            from = walk_end;
            calls++;
        }
        CT_CHECK(mask == 0x25, "resumed scans reported 0x%x, expected 0x25 (pages 0, 2, 5)", mask);
        CT_CHECK(calls >= 3, "three separate regions came back in %d calls with a one-entry vector", calls);
    }
    CT_TRY(scan(f, pm, false, &mask, msg, msglen));
    CT_CHECK(mask == 0, "after the resumed re-protecting scans, pages 0x%x still reported written", mask);
    CT_CHECK((uint8_t)f->base[f->ps] == 0x11 && (uint8_t)f->base[4 * f->ps] == 0x22 &&
                 (uint8_t)f->base[6 * f->ps] == 0x33 && (uint8_t)f->base[5 * f->ps + 1] == ct_pat(5, 1),
             "page contents wrong after async write faults");
out:
    if (pm >= 0) close(pm);
    return rc;
}

static int t_wp_async_unpopulated(struct ct_fix *f, char *msg, size_t msglen) {
    int rc = CUFFD_TEST_PASS;
    int pm = -1;
    uint32_t mask = 0;
    // WP_ASYNC implies WP_UNPOPULATED: the kernel enables it, and granted must say so.
    CT_CHECK(f->features & UFFD_FEATURE_WP_ASYNC, "granted 0x%llx lacks WP_ASYNC", (unsigned long long)f->features);
    CT_CHECK(f->features & UFFD_FEATURE_WP_UNPOPULATED,
             "granted 0x%llx lacks WP_UNPOPULATED, which WP_ASYNC enables", (unsigned long long)f->features);
    // And it is in effect: never-touched pages get protected, so a first write is tracked.
    int e = cuffd_register(f->uffd, U(f->base), 4 * f->ps, UFFDIO_REGISTER_MODE_WP, NULL);
    CT_CHECK(e == 0, "register WP: %s", ct_err(e));
    e = cuffd_writeprotect(f->uffd, U(f->base), 4 * f->ps, true, false);
    CT_CHECK(e == 0, "protect: %s", ct_err(e));
    pm = cuffd_pagemap_open();
    CT_CHECK(pm >= 0, "open pagemap: %s", ct_err(pm));
    CT_TRY(touch(f, 2, 1, 1, 0x5, msg, msglen));
    CT_TRY(scan(f, pm, true, &mask, msg, msglen));
    CT_CHECK(mask == 0x4, "first write to a never-touched page: 0x%x reported, expected 0x4", mask);
out:
    if (pm >= 0) close(pm);
    return rc;
}

// MARK: - the table

CT_CASES(wp) = {
    {"wp", t_wp, CT_M_ALL, CT_F_WP, 4,
     "Protected pages read without faults; writes fault once per page with WRITE|WP; unprotect and re-protect behave."},
    {"wp_unpopulated", t_wp_unpopulated, CT_M_ANON, UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_PAGEFAULT_FLAG_WP, 4,
     "WP_UNPOPULATED: writes to never-touched protected anon pages are WP faults."},
    {"wp_async_scan", t_wp_async_scan, CT_M_ALL, UFFD_FEATURE_WP_ASYNC | CT_F_WP_FILE, 8,
     "WP_ASYNC: writes resolve in the kernel; PAGEMAP_SCAN reports exactly the written pages and re-protects."},
    {"wp_async_unpopulated", t_wp_async_unpopulated, CT_M_ANON, UFFD_FEATURE_WP_ASYNC, 4,
     "WP_ASYNC implies WP_UNPOPULATED: granted reports it, and a first write to a never-touched page is tracked."},
    CT_END,
};
