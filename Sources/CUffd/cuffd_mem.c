// Memory the tests and tools register: anon, shmem (two views), shmem-private, hugetlb (two
// views), hugetlb-private.
#include "CUffd.h"

#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

pid_t cuffd_gettid(void) { return (pid_t)syscall(SYS_gettid); }

uint64_t cuffd_page_size(void) { return (uint64_t)sysconf(_SC_PAGESIZE); }

uint64_t cuffd_hugepage_size(void) {
    FILE *f = fopen("/proc/meminfo", "re");
    if (!f) return 0;
    char line[128];
    uint64_t kb = 0;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "Hugepagesize: %lu kB", &kb) == 1) break;
    }
    fclose(f);
    return kb * 1024;
}

int cuffd_memfd_create(const char *name, unsigned flags) {
    int fd = memfd_create(name, flags);
    return fd < 0 ? -errno : fd;
}

// MADV_POPULATE_READ of [addr, addr+len), again after a signal. 0 or -errno.
static int populate_read(char *addr, uint64_t len) {
    int r;
    do r = madvise(addr, len, MADV_POPULATE_READ);
    while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int cuffd_populate_resident(void *addr, uint64_t len, uint64_t *populated, const int *cancel) {
    const uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    const uint64_t pages = (len + page - 1) / page;
    // Pages per mincore call (64 MiB of 4 KiB pages). A run is flushed at the end of each
    // chunk too, so one MADV_POPULATE_READ covers at most 64 MiB (~5-20 ms here) and `cancel`
    // is seen that often, however long the file's resident runs are.
    enum { CHUNK = 16384 };
    unsigned char vec[CHUNK];
    uint64_t done = 0;
    int rc = 0;
    for (uint64_t base = 0; base < pages && rc == 0; base += CHUNK) {
        if (cancel && __atomic_load_n(cancel, __ATOMIC_RELAXED)) {
            rc = -ECANCELED;
            break;
        }
        uint64_t n = pages - base < CHUNK ? pages - base : CHUNK;
        if (mincore((char *)addr + base * page, n * page, vec) < 0) {
            rc = -errno;
            break;
        }
        uint64_t run = 0, run_len = 0; // the open run of resident pages
        for (uint64_t i = 0; i <= n && rc == 0; i++) {
            if (i < n && (vec[i] & 1)) {
                if (run_len++ == 0) run = base + i;
            } else if (run_len) {
                if (cancel && __atomic_load_n(cancel, __ATOMIC_RELAXED)) {
                    rc = -ECANCELED;
                    break;
                }
                rc = populate_read((char *)addr + run * page, run_len * page);
                if (rc == 0) {
                    done += run_len * page;
                    // Published as it grows: another thread may read it (__atomic_load_n).
                    if (populated) __atomic_store_n(populated, done, __ATOMIC_RELAXED);
                }
                run_len = 0;
            }
        }
    }
    if (populated) __atomic_store_n(populated, done, __ATOMIC_RELAXED);
    return rc;
}

int cuffd_pin_self(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof set, &set) < 0 ? -errno : 0;
}

int cuffd_current_cpu(void) { return sched_getcpu(); }

void *cuffd_map_anon_aligned(uint64_t len, uint64_t align) {
    uint64_t ps = cuffd_page_size();
    if (align < ps) align = ps;
    // Over-map and trim, so the start is aligned without MAP_FIXED guesses.
    uint64_t span = len + align;
    char *p = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    uintptr_t start = ((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1);
    if (start > (uintptr_t)p) munmap(p, start - (uintptr_t)p);
    uintptr_t end = start + len, mend = (uintptr_t)p + span;
    if (mend > end) munmap((void *)end, mend - end);
    return (void *)start;
}

int cuffd_region_map(int kind, uint64_t len, bool thp_align, struct cuffd_region *out) {
    memset(out, 0, sizeof *out);
    out->memfd = -1;
    out->kind = kind;
    out->len = len;
    out->page_size = cuffd_page_size();
    if (len == 0) return -EINVAL;
    if (kind == CUFFD_MEM_ANON) {
        out->addr = thp_align ? cuffd_map_anon_aligned(len, 2u << 20)
                              : mmap(NULL, len, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (out->addr == MAP_FAILED || out->addr == NULL) {
            out->addr = NULL;
            return -ENOMEM;
        }
        return 0;
    }
    unsigned mflags = MFD_CLOEXEC;
    if (kind < CUFFD_MEM_ANON || kind > CUFFD_MEM_HUGETLB_PRIVATE) return -EINVAL;
    if (cuffd_mem_is_hugetlb(kind)) {
        mflags |= MFD_HUGETLB;
        out->page_size = cuffd_hugepage_size();
        if (!out->page_size || len % out->page_size) return -EINVAL;
    }
    int fd = cuffd_memfd_create("uffdkit", mflags);
    if (fd < 0) return fd;
    if (ftruncate(fd, (off_t)len) < 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    // The private kinds: copy-on-write over the file; the alias stays shared (it fills the file).
    int share = kind == CUFFD_MEM_SHMEM_PRIVATE || kind == CUFFD_MEM_HUGETLB_PRIVATE ? MAP_PRIVATE : MAP_SHARED;
    void *a = mmap(NULL, len, PROT_READ | PROT_WRITE, share, fd, 0);
    if (a == MAP_FAILED) {
        int e = -errno;
        close(fd);
        return e;
    }
    void *alias = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (alias == MAP_FAILED) {
        int e = -errno;
        munmap(a, len);
        close(fd);
        return e;
    }
    out->addr = a;
    out->alias = alias;
    out->memfd = fd;
    return 0;
}

void cuffd_region_unmap(struct cuffd_region *r) {
    if (r->addr) munmap(r->addr, r->len);
    if (r->alias) munmap(r->alias, r->len);
    if (r->memfd >= 0) close(r->memfd);
    r->addr = r->alias = NULL;
    r->memfd = -1;
}
