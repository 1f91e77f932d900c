// Dirty tracking with WP_ASYNC: PAGEMAP_SCAN reports the pages written since they were
// write-protected, and can re-protect them in the same walk.
#include "CUffd.h"

#include <errno.h>
#include <fcntl.h>
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
