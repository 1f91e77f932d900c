// Lazy file load: the same file read through a plain mmap, through userfaultfd (pread a
// readahead window into a buffer, UFFDIO_COPY it), and through pread alone (the I/O floor).
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
    char *region;
    uint64_t len, window;
    char *buf;
    int cpu;
    uint64_t faults;
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
        int e = pread_full(c->fd, c->buf, n, off);
        if (e == 0) {
            struct uffdio_copy a = {.dst = base + off, .src = (uint64_t)(uintptr_t)c->buf, .len = n};
            if (ioctl(c->uffd, UFFDIO_COPY, &a) < 0) e = -errno;
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

struct reader {
    char *base;
    uint64_t len;
    int cpu;
    uint64_t t0, t1, sum;
};

static void *reader_main(void *arg) {
    struct reader *r = arg;
    cubench_pin(r->cpu);
    uint64_t sum = 0;
    r->t0 = cuffd_now_ns();
    for (uint64_t off = 0; off < r->len; off += CUBENCH_PAGE) sum += *(volatile uint64_t *)(r->base + off);
    r->t1 = cuffd_now_ns();
    r->sum = sum;
    return NULL;
}

int cubench_file_load(const struct cubench_load_params *p, struct cubench_result *out) {
    memset(out, 0, sizeof *out);
    if (!p->path || p->mode > CUBENCH_LOAD_PREAD) return -EINVAL;
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
    uint32_t timeout = p->timeout_ms ? p->timeout_ms : 60000;
    out->bytes = len;
    out->pages = len / CUBENCH_PAGE;

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
    } else {
        struct lctx c = {.uffd = -1, .stopfd = -1, .fd = fd, .len = len, .window = window, .cpu = p->handler_cpu};
        c.region = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        c.buf = cuffd_map_anon_aligned(window, CUBENCH_PAGE);
        pthread_t h, t;
        bool hstarted = false;
        if (c.region == MAP_FAILED || !c.buf) {
            rc = -ENOMEM;
            goto uout;
        }
        madvise(c.region, len, MADV_NOHUGEPAGE);
        memset(c.buf, 0, window);
        rc = cubench_uffd_open(0, NULL);
        if (rc < 0) goto uout;
        c.uffd = rc;
        rc = cuffd_register(c.uffd, (uint64_t)(uintptr_t)c.region, len, UFFDIO_REGISTER_MODE_MISSING, NULL);
        if (rc < 0) goto uout;
        c.stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (c.stopfd < 0) {
            rc = -errno;
            goto uout;
        }
        if ((rc = -pthread_create(&h, NULL, load_handler, &c)) < 0) goto uout;
        hstarted = true;
        struct reader r = {.base = c.region, .len = len, .cpu = p->fault_cpu};
        if ((rc = -pthread_create(&t, NULL, reader_main, &r)) < 0) goto uout;
        struct timespec dl = cuffd_deadline_after_ms(timeout);
        if (cubench_join_until(t, &dl) != 0) {
            // Watchdog: stop the handler, unregister (wakes the reader), then join.
            cubench_signal(c.stopfd);
            pthread_join(h, NULL);
            hstarted = false;
            cuffd_unregister(c.uffd, (uint64_t)(uintptr_t)c.region, len);
            pthread_join(t, NULL);
            rc = -ETIMEDOUT;
        }
        out->ns = r.t1 > r.t0 ? r.t1 - r.t0 : 0;
        out->checksum = r.sum;
        out->faults = c.faults;
        out->ioctls = c.faults;
        if (rc == 0 && atomic_load(&c.first_error)) rc = -atomic_load(&c.first_error);
    uout:
        if (hstarted) {
            cubench_signal(c.stopfd);
            pthread_join(h, NULL);
        }
        if (c.uffd >= 0) close(c.uffd);
        if (c.stopfd >= 0) close(c.stopfd);
        if (c.region != MAP_FAILED && c.region) munmap(c.region, len);
        if (c.buf) munmap(c.buf, window);
    }
    close(fd);
    if (rc == 0 && out->checksum != expected_sum(len)) rc = -EILSEQ;
    return rc;
}
