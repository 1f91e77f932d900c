// Lazy file load: the same file read through a plain mmap, through userfaultfd (pread a
// readahead window into a buffer, UFFDIO_COPY it; UFFDIO_COPY straight from a mapping of the
// file; the window installer: pread into a huge-page donor, UFFDIO_MOVE, prefetch threads), and
// through pread alone (the I/O floor), and through pread into freshly populated huge-page windows
// (the physical limit of a load into fresh memory).
#include "cubench_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

// The first 8 bytes of page i hold i * K + 1, so every mode can check what it read.
#define PAGE_TAG(i) ((uint64_t)(i) * 0x9e3779b97f4a7c15ull + 1)

int cubench_file_create(const char *path, uint64_t bytes) {
    int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
    if (fd < 0) return -errno;
    const uint64_t chunk = 1u << 20;
    char *buf = malloc(chunk);
    if (!buf) {
        close(fd);
        return -ENOMEM;
    }
    memset(buf, 0xa5, chunk);
    int rc = 0;
    for (uint64_t off = 0; off < bytes && rc == 0; off += chunk) {
        uint64_t n = bytes - off < chunk ? bytes - off : chunk;
        for (uint64_t p = 0; p < n; p += CUBENCH_PAGE) {
            uint64_t tag = PAGE_TAG((off + p) / CUBENCH_PAGE);
            memcpy(buf + p, &tag, sizeof tag);
        }
        for (uint64_t w = 0; w < n;) {
            ssize_t k = pwrite(fd, buf + w, n - w, (off_t)(off + w));
            if (k < 0) {
                if (errno == EINTR) continue;
                rc = -errno;
                break;
            }
            w += (uint64_t)k;
        }
    }
    free(buf);
    if (rc == 0 && fsync(fd) < 0) rc = -errno;
    close(fd);
    return rc;
}

static uint64_t expected_sum(uint64_t bytes) {
    uint64_t s = 0;
    for (uint64_t i = 0; i < bytes / CUBENCH_PAGE; i++) s += PAGE_TAG(i);
    return s;
}

// Reads exactly n bytes at off (short reads continue). 0 or -errno (-EIO at end of file).
static int pread_full(int fd, char *buf, uint64_t n, uint64_t off) {
    for (uint64_t got = 0; got < n;) {
        ssize_t k = pread(fd, buf + got, n - got, (off_t)(off + got));
        if (k < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (k == 0) return -EIO;
        got += (uint64_t)k;
    }
    return 0;
}

struct lctx {
    int uffd, stopfd, fd;
    uint32_t mode;
    char *region;
    const char *fmap; // MAPCOPY: the file mapped read-only
    uint64_t len, window;
    char *buf;
    int cpu;
    struct cuffd_installer *inst;
    uint64_t faults, ioctls;
    _Atomic int first_error;
};

static void *load_handler(void *arg) {
    struct lctx *c = arg;
    cubench_pin(c->cpu);
    for (;;) {
        struct uffd_msg m;
        if (cubench_next_fault(c->uffd, c->stopfd, &m) <= 0) break;
        c->faults++;
        uint64_t base = (uint64_t)(uintptr_t)c->region;
        uint64_t off = (m.arg.pagefault.address - base) & ~(c->window - 1);
        uint64_t n = c->len - off < c->window ? c->len - off : c->window;
        int e = 0;
        if (c->mode == CUBENCH_LOAD_INSTALL) {
            e = cuffd_installer_install(c->inst, m.arg.pagefault.address);
            if (e == 0) continue;
            off = (m.arg.pagefault.address - base) & ~(uint64_t)(CUBENCH_PAGE - 1);
            n = CUBENCH_PAGE;
        } else {
            const char *src = c->buf;
            if (c->mode == CUBENCH_LOAD_MAPCOPY || c->mode == CUBENCH_LOAD_MAPCOPY_POPULATED) src = c->fmap + off;
            else e = pread_full(c->fd, c->buf, n, off);
            if (e == 0) {
                c->ioctls++;
                struct uffdio_copy a = {.dst = base + off, .src = (uint64_t)(uintptr_t)src, .len = n};
                if (ioctl(c->uffd, UFFDIO_COPY, &a) < 0 && errno != EEXIST) e = -errno;
            }
        }
        if (e < 0) {
            int zero = 0;
            atomic_compare_exchange_strong(&c->first_error, &zero, -e);
            // The reader must not hang on an I/O error: a zero page, or at least a wake.
            struct uffdio_zeropage z = {.range = {.start = base + off, .len = n}};
            if (ioctl(c->uffd, UFFDIO_ZEROPAGE, &z) < 0) {
                struct uffdio_range r = {.start = m.arg.pagefault.address & ~(CUBENCH_PAGE - 1), .len = CUBENCH_PAGE};
                ioctl(c->uffd, UFFDIO_WAKE, &r);
            }
        }
    }
    return NULL;
}

// The installer's fill: pread (or memcpy from `map`, a read-only mapping of the file), zeros
// past the end of the file.
struct fillctx {
    int fd;
    uint64_t size;
    const char *map;
};

static int fill_pread(void *ctx, uint64_t off, void *dst, uint64_t n) {
    struct fillctx *f = ctx;
    uint64_t have = off >= f->size ? 0 : (f->size - off < n ? f->size - off : n);
    int rc = have ? pread_full(f->fd, dst, have, off) : 0;
    if (rc == 0 && have < n) memset((char *)dst + have, 0, n - have);
    return rc;
}

// The variant: one MADV_POPULATE_READ maps the window's page-cache folios (instead of a fault
// per 16 pages of fault-around), then a user-space copy.
static int fill_mapped(void *ctx, uint64_t off, void *dst, uint64_t n) {
    struct fillctx *f = ctx;
    uint64_t have = off >= f->size ? 0 : (f->size - off < n ? f->size - off : n);
    if (have) {
        if (madvise((void *)(f->map + off), have, MADV_POPULATE_READ) < 0) return -errno;
        memcpy(dst, f->map + off, have);
    }
    if (have < n) memset((char *)dst + have, 0, n - have);
    return 0;
}

struct reader {
    char *base;
    uint64_t len, window;
    int cpu;
    // random: windows taken from a shared shuffled list
    const uint32_t *order;
    uint32_t nwin;
    _Atomic uint32_t *cursor;
    uint64_t t0, t1, sum;
};

static void *reader_main(void *arg) {
    struct reader *r = arg;
    cubench_pin(r->cpu);
    uint64_t sum = 0;
    r->t0 = cuffd_now_ns();
    if (r->order) {
        for (;;) {
            uint32_t i = atomic_fetch_add(r->cursor, 1);
            if (i >= r->nwin) break;
            uint64_t s = (uint64_t)r->order[i] * r->window, e = s + r->window < r->len ? s + r->window : r->len;
            for (uint64_t off = s; off < e; off += CUBENCH_PAGE) sum += *(volatile uint64_t *)(r->base + off);
        }
    } else {
        for (uint64_t off = 0; off < r->len; off += CUBENCH_PAGE) sum += *(volatile uint64_t *)(r->base + off);
    }
    r->t1 = cuffd_now_ns();
    r->sum = sum;
    return NULL;
}

enum { MAX_READERS = 8 };

// PREAD_FRESH: one thread of the fresh-memory limit.
struct fresh_reader {
    char *region;
    int fd, cpu;
    uint64_t len, window;
    _Atomic uint64_t *next;
    uint64_t t0, t1, sum;
    int rc;
};

static void *fresh_main(void *arg) {
    struct fresh_reader *r = arg;
    cubench_pin(r->cpu);
    uint64_t sum = 0;
    r->t0 = cuffd_now_ns();
    for (;;) {
        uint64_t off = atomic_fetch_add(r->next, 1) * r->window;
        if (off >= r->len) break;
        uint64_t n = r->len - off < r->window ? r->len - off : r->window;
        // What the installer does per window minus userfaultfd: a zeroed huge page, the bytes
        // read into it once.
        if (madvise(r->region + off, n, MADV_POPULATE_WRITE) < 0) {
            r->rc = -errno;
            break;
        }
        if ((r->rc = pread_full(r->fd, r->region + off, n, off)) < 0) break;
        for (uint64_t q = 0; q < n; q += CUBENCH_PAGE) sum += *(volatile uint64_t *)(r->region + off + q);
    }
    r->t1 = cuffd_now_ns();
    r->sum = sum;
    return NULL;
}

static int load_fresh(const struct cubench_load_params *p, int fd, uint64_t len, uint64_t window,
                      struct cubench_result *out) {
    uint32_t nthreads = p->threads ? p->threads : 1;
    if (nthreads > MAX_READERS) return -EINVAL;
    int ncpu = cubench_ncpus();
    uint64_t maplen = (len + CUBENCH_2M - 1) & ~(CUBENCH_2M - 1);
    char *region = cuffd_map_anon_aligned(maplen, CUBENCH_2M);
    if (!region) return -ENOMEM;
    madvise(region, maplen, MADV_HUGEPAGE);
    _Atomic uint64_t next = 0;
    struct fresh_reader r[MAX_READERS];
    pthread_t t[MAX_READERS];
    uint32_t started = 0;
    int rc = 0;
    for (uint32_t i = 0; i < nthreads; i++) {
        r[i] = (struct fresh_reader){.region = region, .fd = fd, .len = len, .window = window, .next = &next,
                                     .cpu = p->fault_cpu >= 0 ? (p->fault_cpu + (int)i) % ncpu : -1};
        if ((rc = -pthread_create(&t[i], NULL, fresh_main, &r[i])) < 0) break;
        started++;
    }
    // pread of a regular file and populating anonymous memory cannot block forever: join plainly.
    uint64_t t0 = UINT64_MAX, t1 = 0, sum = 0;
    for (uint32_t i = 0; i < started; i++) {
        pthread_join(t[i], NULL);
        if (r[i].rc < 0 && rc == 0) rc = r[i].rc;
        if (r[i].t0 < t0) t0 = r[i].t0;
        if (r[i].t1 > t1) t1 = r[i].t1;
        sum += r[i].sum;
    }
    if (rc == 0) {
        out->ns = t1 > t0 ? t1 - t0 : 0;
        out->checksum = sum;
    }
    munmap(region, maplen);
    return rc;
}

// UFFD, MAPCOPY and INSTALL: a region registered MISSING, one handler, `threads` readers.
static int load_uffd(struct cubench_load_params *p, int fd, uint64_t len, uint64_t window, uint64_t fsize,
                     struct cubench_result *out) {
    uint32_t timeout = p->timeout_ms ? p->timeout_ms : 60000;
    uint32_t nthreads = p->threads ? p->threads : 1;
    if (nthreads > MAX_READERS) return -EINVAL;
    int ncpu = cubench_ncpus();
    bool install = p->mode == CUBENCH_LOAD_INSTALL;
    // The installer moves into THP-eligible memory; in COPY mode it stands for a destination THP
    // cannot back (what InstallPolicy copies into), so that one is MADV_NOHUGEPAGE.
    bool thp_dst = install && !(p->install_flags & CUFFD_INSTALL_COPY);
    struct lctx c = {.uffd = -1, .stopfd = -1, .fd = fd, .mode = p->mode, .len = len, .window = window,
                     .cpu = p->handler_cpu};
    struct fillctx fc = {.fd = fd, .size = fsize};
    char *fillmap = NULL;
    uint64_t fillmap_len = (fsize + CUBENCH_2M - 1) & ~(CUBENCH_2M - 1);
    uint32_t *order = NULL;
    _Atomic uint32_t cursor = 0;
    pthread_t h, t[MAX_READERS];
    struct reader r[MAX_READERS];
    uint32_t started = 0;
    bool hstarted = false;
    int rc = 0;
    // INSTALL (MOVE): a THP-eligible destination (huge pages end up backing it); the copying
    // modes copy into 4 KiB pages (COPY into a THP-eligible range is slower: BENCHMARKS.md).
    c.region = install ? cuffd_map_anon_aligned(len, 2u << 20)
                       : mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (c.region == MAP_FAILED) c.region = NULL;
    if (!c.region) return -ENOMEM;
    madvise(c.region, len, thp_dst ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    if (p->mode == CUBENCH_LOAD_UFFD) {
        c.buf = cuffd_map_anon_aligned(window, CUBENCH_PAGE);
        if (!c.buf) {
            rc = -ENOMEM;
            goto uout;
        }
        memset(c.buf, 0, window);
    } else if (p->mode == CUBENCH_LOAD_MAPCOPY || p->mode == CUBENCH_LOAD_MAPCOPY_POPULATED) {
        void *m = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            rc = -errno;
            goto uout;
        }
        c.fmap = m;
        // What FileSource .mapped and serve do: the pages the page cache holds are mapped up
        // front, so the COPY does not fault on its source (a cold file: nothing, no read).
        if (p->mode == CUBENCH_LOAD_MAPCOPY_POPULATED) {
            uint64_t t0 = cuffd_now_ns();
            rc = cuffd_populate_resident(m, len, &p->populated, NULL);
            p->populate_ns = cuffd_now_ns() - t0;
            if (rc < 0) goto uout;
        }
    }
    if (p->random) {
        uint32_t nwin = (uint32_t)((len + window - 1) / window);
        order = malloc(nwin * sizeof *order);
        if (!order) {
            rc = -ENOMEM;
            goto uout;
        }
        for (uint32_t i = 0; i < nwin; i++) order[i] = i;
        uint64_t x = 0x9e3779b97f4a7c15ull;
        for (uint32_t i = nwin - 1; i > 0; i--) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            uint32_t j = (uint32_t)(x % (i + 1));
            uint32_t tmp = order[i];
            order[i] = order[j];
            order[j] = tmp;
        }
    }
    rc = cubench_uffd_open(0, NULL);
    if (rc < 0) goto uout;
    c.uffd = rc;
    rc = cuffd_register(c.uffd, (uint64_t)(uintptr_t)c.region, len, UFFDIO_REGISTER_MODE_MISSING, NULL);
    if (rc < 0) goto uout;
    if (install && p->fill_mapped) {
        // 2 MiB-aligned, so a PMD-sized page-cache folio can be mapped by one PMD.
        fillmap = cuffd_map_anon_aligned(fillmap_len, CUBENCH_2M);
        if (!fillmap || mmap(fillmap, fsize, PROT_READ, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) {
            rc = fillmap ? -errno : -ENOMEM;
            goto uout;
        }
        fc.map = fillmap;
    }
    if (install) {
        struct cuffd_installer_config ic = {.uffd = c.uffd, .start = (uint64_t)(uintptr_t)c.region, .len = len,
                                            .window = window, .fill = fc.map ? fill_mapped : fill_pread, .ctx = &fc,
                                            .flags = p->install_flags, .fillers = p->fillers};
        for (uint32_t i = 0; i < 4; i++) ic.filler_cpus[i] = ncpu > 0 ? (int32_t)((p->filler_cpu + (int)i) % ncpu) : -1;
        rc = cuffd_installer_create(&ic, &c.inst);
        if (rc < 0) goto uout;
    }
    c.stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (c.stopfd < 0) {
        rc = -errno;
        goto uout;
    }
    if ((rc = -pthread_create(&h, NULL, load_handler, &c)) < 0) goto uout;
    hstarted = true;
    for (uint32_t i = 0; i < nthreads; i++) {
        r[i] = (struct reader){.base = c.region, .len = len, .window = window,
                               .cpu = ncpu > 0 ? (p->fault_cpu + (int)i) % ncpu : p->fault_cpu,
                               .order = order, .nwin = (uint32_t)((len + window - 1) / window), .cursor = &cursor};
        if ((rc = -pthread_create(&t[i], NULL, reader_main, &r[i])) < 0) break;
        started++;
    }
    struct timespec dl = cuffd_deadline_after_ms(timeout);
    bool timed_out = false;
    for (uint32_t i = 0; i < started; i++) {
        if (!timed_out && cubench_join_until(t[i], &dl) != 0) {
            // Watchdog: stop the handler and the fillers, unregister (wakes the readers), then join.
            timed_out = true;
            cubench_signal(c.stopfd);
            pthread_join(h, NULL);
            hstarted = false;
            if (c.inst) cuffd_installer_stop(c.inst);
            cuffd_unregister(c.uffd, (uint64_t)(uintptr_t)c.region, len);
            rc = -ETIMEDOUT;
        }
        if (timed_out) pthread_join(t[i], NULL);
    }
    if (started == nthreads && rc == 0) {
        uint64_t t0 = UINT64_MAX, t1 = 0, sum = 0;
        for (uint32_t i = 0; i < nthreads; i++) {
            if (r[i].t0 < t0) t0 = r[i].t0;
            if (r[i].t1 > t1) t1 = r[i].t1;
            sum += r[i].sum;
        }
        out->ns = t1 > t0 ? t1 - t0 : 0;
        out->checksum = sum;
    }
    out->faults = c.faults;
    out->ioctls = c.ioctls;
    if (c.inst) {
        cuffd_installer_stop(c.inst);
        struct cuffd_installer_stats st;
        cuffd_installer_stats(c.inst, &st);
        out->ioctls = st.moved + st.copied;
        if (st.failed && rc == 0) rc = -EIO;
        int64_t hb = cuffd_huge_bytes((uint64_t)(uintptr_t)c.region, len);
        p->huge_bytes = hb > 0 ? (uint64_t)hb : 0;
        p->alloc_ns = st.alloc_ns;
        p->fill_ns = st.fill_ns;
        p->place_ns = st.place_ns;
    }
    if (rc == 0 && atomic_load(&c.first_error)) rc = -atomic_load(&c.first_error);
uout:
    if (hstarted) {
        cubench_signal(c.stopfd);
        pthread_join(h, NULL);
    }
    cuffd_installer_destroy(c.inst);
    if (c.uffd >= 0) close(c.uffd);
    if (c.stopfd >= 0) close(c.stopfd);
    if (c.region) munmap(c.region, len);
    if (c.buf) munmap(c.buf, window);
    if (c.fmap) munmap((void *)c.fmap, len);
    if (fillmap) munmap(fillmap, fillmap_len);
    free(order);
    return rc;
}

int cubench_file_load(struct cubench_load_params *p, struct cubench_result *out) {
    memset(out, 0, sizeof *out);
    if (!p->path || p->mode > CUBENCH_LOAD_PREAD_FRESH) return -EINVAL;
    uint64_t window = p->window ? p->window : (2u << 20);
    if (window < CUBENCH_PAGE || window % CUBENCH_PAGE) return -EINVAL;
    uint64_t len = p->bytes & ~(CUBENCH_PAGE - 1);
    int fd = open(p->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct stat_like { uint64_t size; } st = {(uint64_t)lseek(fd, 0, SEEK_END)};
    if (len == 0 || len > st.size) {
        close(fd);
        return -EINVAL;
    }
    if (p->drop_cache) {
        // Cold page cache: what a lazy load of a file not read recently sees. No-op on tmpfs.
        fdatasync(fd);
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    }
    int rc = 0;
    out->bytes = len;
    out->pages = len / CUBENCH_PAGE;
    // Every mode alike, just before its timed section (the set-up below allocates nothing of
    // this size): the region's memory. Not the page cache a cold run refills: that runs at the
    // disk's pace, and priming it too doubled the priming time of the cold rows.
    if (!p->no_prime && (rc = cubench_prime_memory(len)) < 0) {
        close(fd);
        return rc;
    }

    if (p->mode == CUBENCH_LOAD_PREAD) {
        char *buf = cuffd_map_anon_aligned(window, CUBENCH_PAGE);
        if (!buf) {
            close(fd);
            return -ENOMEM;
        }
        memset(buf, 0, window);
        cpu_set_t saved;
        cubench_pin_caller(p->fault_cpu, &saved);
        uint64_t sum = 0, t0 = cuffd_now_ns();
        for (uint64_t off = 0; off < len && rc == 0; off += window) {
            uint64_t n = len - off < window ? len - off : window;
            rc = pread_full(fd, buf, n, off);
            for (uint64_t q = 0; q < n; q += CUBENCH_PAGE) sum += *(volatile uint64_t *)(buf + q);
        }
        out->ns = cuffd_now_ns() - t0;
        cubench_unpin_caller(p->fault_cpu, &saved);
        out->checksum = sum;
        munmap(buf, window);
    } else if (p->mode == CUBENCH_LOAD_MMAP) {
        char *m = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            close(fd);
            return -errno;
        }
        struct reader r = {.base = m, .len = len, .cpu = p->fault_cpu};
        pthread_t t;
        rc = -pthread_create(&t, NULL, reader_main, &r);
        if (rc == 0) {
            // A page-cache read cannot block forever; join plainly.
            pthread_join(t, NULL);
            out->ns = r.t1 - r.t0;
            out->checksum = r.sum;
        }
        munmap(m, len);
    } else if (p->mode == CUBENCH_LOAD_PREAD_FRESH) {
        rc = load_fresh(p, fd, len, window, out);
    } else {
        rc = load_uffd(p, fd, len, window, st.size, out);
    }
    close(fd);
    if (rc == 0 && out->checksum != expected_sum(len)) rc = -EILSEQ;
    return rc;
}
