// Dirty tracking with WP_ASYNC: PAGEMAP_SCAN reports the pages written since they were
// write-protected, and can re-protect them in the same walk.
#include "CUffd.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>

int cuffd_pagemap_open(void) {
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int cuffd_pagemap_scan_written(int pagemap_fd, uint64_t start, uint64_t end, bool reprotect,
                               struct page_region *vec, size_t vec_len, uint64_t *walk_end) {
    struct pm_scan_arg arg = {
        .size = sizeof(arg),
        .flags = reprotect ? (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC) : 0,
        .start = start,
        .end = end,
        .walk_end = 0,
        .vec = (uint64_t)(uintptr_t)vec,
        .vec_len = vec_len,
        .max_pages = 0,
        .category_inverted = 0,
        .category_mask = PAGE_IS_WRITTEN,
        .category_anyof_mask = 0,
        .return_mask = PAGE_IS_WRITTEN,
    };
    int n = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
    if (n < 0) return -errno;
    if (walk_end) *walk_end = arg.walk_end;
    return n;
}

int cuffd_pagemap_open_pid(int pid) {
    char path[40];
    if (pid == 0) snprintf(path, sizeof path, "/proc/self/pagemap");
    else snprintf(path, sizeof path, "/proc/%d/pagemap", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    // No /proc/PID (exited and reaped, or never was) is the same answer as a dead mm: gone.
    if (fd < 0) return errno == ENOENT ? -ESRCH : -errno;
    return fd;
}

int64_t cuffd_huge_bytes_fd(int pagemap_fd, uint64_t start, uint64_t len) {
    // Measured on 6.18: a hugetlb entry without a page (never touched, or removed) still
    // reports PAGE_IS_HUGE, and a THP read fault maps the huge zero page (HUGE|PFNZERO), so
    // only present, non-zero-page huge entries count (PFNZERO inverted: it must be clear).
    struct page_region vec[64];
    int64_t total = 0;
    uint64_t at = start, end = start + len;
    while (at < end) {
        struct pm_scan_arg a = {
            .size = sizeof a,
            .start = at,
            .end = end,
            .vec = (uint64_t)(uintptr_t)vec,
            .vec_len = 64,
            .category_inverted = PAGE_IS_PFNZERO,
            .category_mask = PAGE_IS_HUGE | PAGE_IS_PRESENT | PAGE_IS_PFNZERO,
            .return_mask = PAGE_IS_HUGE,
        };
        int n = ioctl(pagemap_fd, PAGEMAP_SCAN, &a);
        if (n < 0) return -errno;
        for (int i = 0; i < n; i++) total += (int64_t)(vec[i].end - vec[i].start);
        // The walk stops early only when vec filled up; go on from where it stopped.
        if (a.walk_end <= at) break;
        at = a.walk_end;
    }
    return total;
}
