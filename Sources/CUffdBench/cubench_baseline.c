// Baselines without userfaultfd: what a fault, a populate and a page copy cost on this machine.
#include "cubench_internal.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

static void fill_result(struct cubench_result *out, uint64_t ns, uint64_t pages) {
    memset(out, 0, sizeof *out);
    out->ns = ns;
    out->pages = pages;
    out->bytes = pages * CUBENCH_PAGE;
}

int cubench_first_touch(uint64_t pages, const struct cubench_placement *pl, struct cubench_result *out) {
    uint64_t len = pages * CUBENCH_PAGE;
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return -errno;
    // 4 KiB faults: the unit a uffd handler resolves.
    madvise(p, len, MADV_NOHUGEPAGE);
    uint64_t ns = 0;
    int rc = cubench_run_touchers(p, len, CUBENCH_PAGE, pl, true, 0, NULL, NULL, &ns);
    fill_result(out, ns, pages);
    out->checksum = (uint64_t)(uint8_t)p[len - CUBENCH_PAGE];
    munmap(p, len);
    return rc;
}

int cubench_populate_write(uint64_t pages, const struct cubench_placement *pl, struct cubench_result *out) {
    uint64_t len = pages * CUBENCH_PAGE;
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return -errno;
    madvise(p, len, MADV_NOHUGEPAGE);
    cpu_set_t saved;
    cubench_pin_caller(pl->fault_cpu, &saved);
    uint64_t t0 = cuffd_now_ns();
    int rc = madvise(p, len, MADV_POPULATE_WRITE) < 0 ? -errno : 0;
    uint64_t t1 = cuffd_now_ns();
    cubench_unpin_caller(pl->fault_cpu, &saved);
    fill_result(out, t1 - t0, pages);
    munmap(p, len);
    return rc;
}

int cubench_memcpy_4k(uint64_t pages, const struct cubench_placement *pl, struct cubench_result *out) {
    uint64_t len = pages * CUBENCH_PAGE;
    char *src = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (src == MAP_FAILED) return -errno;
    char *dst = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (dst == MAP_FAILED) {
        int e = -errno;
        munmap(src, len);
        return e;
    }
    memset(src, 0x5a, len);
    memset(dst, 0, len);
    cpu_set_t saved;
    cubench_pin_caller(pl->fault_cpu, &saved);
    uint64_t t0 = cuffd_now_ns();
    for (uint64_t off = 0; off < len; off += CUBENCH_PAGE) memcpy(dst + off, src + off, CUBENCH_PAGE);
    uint64_t t1 = cuffd_now_ns();
    cubench_unpin_caller(pl->fault_cpu, &saved);
    fill_result(out, t1 - t0, pages);
    // Reading the result keeps the copies observable.
    out->checksum = (uint64_t)(uint8_t)((volatile char *)dst)[len - 1];
    munmap(src, len);
    munmap(dst, len);
    return 0;
}
