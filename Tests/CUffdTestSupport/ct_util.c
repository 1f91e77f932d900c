// Shared helpers of the C tests (see ct.h).
#include "ct.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

const char *ct_kind_name(int kind) { return cuffd_test_mem_name(kind); }

const char *ct_err(int e) {
    if (e < 0) e = -e;
    switch (e) {
    case 0: return "0";
    case EAGAIN: return "EAGAIN";
    case EEXIST: return "EEXIST";
    case ENOENT: return "ENOENT";
    case EINVAL: return "EINVAL";
    case EBUSY: return "EBUSY";
    case ESRCH: return "ESRCH";
    case ENOMEM: return "ENOMEM";
    case EFAULT: return "EFAULT";
    case EPERM: return "EPERM";
    case ENOTTY: return "ENOTTY";
    case EIO: return "EIO";
    case ETIMEDOUT: return "ETIMEDOUT";
    default: return strerror(e);
    }
}

void ct_fill_pattern(char *p, size_t ps, size_t page) {
    for (size_t o = 0; o < ps; o++) p[o] = (char)ct_pat(page, o);
}

long ct_check_pattern(const char *p, size_t ps, size_t page) {
    for (size_t o = 0; o < ps; o++)
        if ((uint8_t)p[o] != ct_pat(page, o)) return (long)o;
    return -1;
}

long ct_check_zero(const char *p, size_t ps) {
    for (size_t o = 0; o < ps; o++)
        if (p[o]) return (long)o;
    return -1;
}

int ct_present(const void *addr) {
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    uint64_t e = 0;
    off_t off = (off_t)(((uintptr_t)addr / cuffd_page_size()) * 8); // one entry per base page
    ssize_t n = pread(fd, &e, sizeof e, off);
    int err = errno;
    close(fd);
    if (n != (ssize_t)sizeof e) return n < 0 ? -err : -EIO;
    return (e >> 63) & 1 || (e >> 62) & 1;
}

int ct_pagemap_entry(const void *addr, uint64_t *entry) {
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    off_t off = (off_t)(((uintptr_t)addr / cuffd_page_size()) * 8); // one entry per base page
    ssize_t n = pread(fd, entry, sizeof *entry, off);
    int err = errno;
    close(fd);
    if (n != (ssize_t)sizeof *entry) return n < 0 ? -err : -EIO;
    return 0;
}

int ct_release(struct ct_fix *f, size_t first, size_t n) {
    int advice = ct_is_shared_file(f->kind) ? MADV_REMOVE : MADV_DONTNEED;
    return madvise(f->base + first * f->ps, n * f->ps, advice) == 0 ? 0 : -errno;
}

int ct_need_features(uint64_t want, char *msg, size_t msglen) {
    uint64_t avail = 0, ioctls = 0;
    int e = cuffd_probe(&avail, &ioctls);
    if (e < 0) {
        snprintf(msg, msglen, "cannot probe userfaultfd features: %s", ct_err(e));
        return CUFFD_TEST_SKIP;
    }
    uint64_t missing = want & ~avail;
    if (!missing) return CUFFD_TEST_PASS;
    size_t n = (size_t)snprintf(msg, msglen, "kernel lacks UFFD_FEATURE");
    for (unsigned b = 0; b < 64 && n < msglen; b++) {
        if (!(missing >> b & 1)) continue;
        const char *name = cuffd_feature_name(b);
        n += (size_t)snprintf(msg + n, msglen - n, " %s", name ? name : "?");
    }
    return CUFFD_TEST_SKIP;
}

static long read_long(const char *path) {
    FILE *f = fopen(path, "re");
    if (!f) return -1;
    long v = -1;
    if (fscanf(f, "%ld", &v) != 1) v = -1;
    fclose(f);
    return v;
}

int ct_map(int kind, uint64_t len, struct cuffd_region *r, char *msg, size_t msglen) {
    int e = cuffd_region_map(kind, len, false, r);
    if (e == 0) return CUFFD_TEST_PASS;
    if (ct_is_hugetlb(kind)) {
        int re = ct_hugetlb_reserve_error();
        char why[96];
        if (re == 1) snprintf(why, sizeof why, "no reservation was attempted");
        else if (re < 0) snprintf(why, sizeof why, "raising vm.nr_hugepages failed: %s (needs root)", ct_err(re));
        else snprintf(why, sizeof why, "huge pages were reserved but are in use");
        snprintf(msg, msglen, "cannot map %llu MiB of hugetlb memory (%s): nr_hugepages=%ld, %s",
                 (unsigned long long)(len >> 20), ct_err(e), read_long("/proc/sys/vm/nr_hugepages"), why);
        return CUFFD_TEST_SKIP;
    }
    snprintf(msg, msglen, "cuffd_region_map(%s, %llu): %s", ct_kind_name(kind),
             (unsigned long long)len, ct_err(e));
    return CUFFD_TEST_FAIL;
}

int ct_fix_init(struct ct_fix *f, int kind, size_t npages, uint64_t features, char *msg,
                size_t msglen) {
    memset(f, 0, sizeof *f);
    f->uffd = -1;
    f->r.memfd = -1;
    f->kind = kind;
    f->npages = npages;
    int rc = ct_need_features(features, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    uint64_t io = 0;
    cuffd_probe(&f->avail, &io);
    uint64_t ps = ct_is_hugetlb(kind) ? cuffd_hugepage_size() : cuffd_page_size();
    if (!ps) {
        snprintf(msg, msglen, "no default huge page size in /proc/meminfo");
        return CUFFD_TEST_SKIP;
    }
    rc = ct_map(kind, ps * npages, &f->r, msg, msglen);
    if (rc != CUFFD_TEST_PASS) return rc;
    f->ps = f->r.page_size;
    f->base = f->r.addr;
    f->alias = f->r.alias;
    f->src = mmap(NULL, ps * npages, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (f->src == MAP_FAILED) {
        f->src = NULL;
        snprintf(msg, msglen, "mmap source: %s", ct_err(errno));
        ct_fix_fini(f);
        return CUFFD_TEST_FAIL;
    }
    for (size_t i = 0; i < npages; i++) ct_fill_pattern(f->src + i * ps, ps, i);
    int fd = cuffd_open(CUFFD_OPEN_NONBLOCK, NULL, NULL);
    if (fd < 0) {
        snprintf(msg, msglen, "cuffd_open: %s", ct_err(fd));
        ct_fix_fini(f);
        return CUFFD_TEST_FAIL;
    }
    f->uffd = fd;
    uint64_t ioctls = 0;
    int e = cuffd_api(fd, features, &f->features, &ioctls);
    if (e < 0) {
        snprintf(msg, msglen, "cuffd_api(features 0x%llx): %s", (unsigned long long)features,
                 ct_err(e));
        ct_fix_fini(f);
        return CUFFD_TEST_FAIL;
    }
    return CUFFD_TEST_PASS;
}

void ct_fix_fini(struct ct_fix *f) {
    if (atomic_load(&ct_abandoned)) return; // a blocked thread may still use all of it
    if (f->uffd >= 0) close(f->uffd);
    f->uffd = -1;
    if (f->r.addr || f->r.alias) cuffd_region_unmap(&f->r);
    if (f->src) munmap(f->src, f->ps ? f->ps * f->npages : 0);
    f->src = NULL;
}

atomic_int ct_abandoned;

int ct_join(pthread_t th, int timeout_ms) {
    if (cuffd_join_within(th, (uint32_t)timeout_ms) == 0) return 0;
    atomic_store(&ct_abandoned, 1);
    return -ETIMEDOUT;
}

int ct_touch_catch(volatile char *p, int write, uint8_t wval, uint8_t *read_val, void **fault_addr) {
    uint64_t v = 0;
    int sig = cuffd_access_catching(p, write ? CUFFD_ACCESS_WRITE8 : CUFFD_ACCESS_READ8, wval, false,
                                    &v, fault_addr);
    if (sig) return 1;
    if (!write && read_val) *read_val = (uint8_t)v;
    return 0;
}

static void *toucher_main(void *arg) {
    struct ct_toucher *t = arg;
    t->tid = cuffd_gettid();
    atomic_store(&t->started, 1);
    for (size_t i = 0; i < t->count; i++) {
        volatile char *p = t->addr + i * t->stride;
        if (t->catch_sigbus) {
            uint8_t v = 0;
            void *fa = NULL;
            if (ct_touch_catch(p, t->write, t->wval, &v, &fa)) {
                t->sigbus = 1;
                t->sigbus_addr = fa;
                break;
            }
            t->sum += v;
        } else if (t->write) {
            *p = (char)t->wval;
        } else {
            t->sum += (uint8_t)*p;
        }
        t->touched = i + 1;
    }
    atomic_store(&t->finished, 1);
    return NULL;
}

int ct_touch_start(struct ct_toucher *t) {
    if (!t->stride) t->stride = cuffd_page_size();
    if (!t->count) t->count = 1;
    int e = pthread_create(&t->th, NULL, toucher_main, t);
    if (e) return -e;
    // Wait until the thread runs, so tid is known before its first fault.
    for (int i = 0; i < 5000 && !atomic_load(&t->started); i++) usleep(1000);
    return 0;
}

int ct_touch_join(struct ct_toucher *t, int timeout_ms) {
    return ct_join(t->th, timeout_ms);
}

int ct_read_msg(int uffd, struct uffd_msg *m, int timeout_ms) {
    int w = cuffd_wait_readable(uffd, timeout_ms);
    if (w <= 0) return w;
    ssize_t n = cuffd_read_msgs(uffd, m, 1);
    if (n < 0) return (int)n;
    return n > 0 ? 1 : 0;
}

static int handler_resolve(struct ct_handler *h, const struct uffd_msg *m) {
    uint64_t a = m->arg.pagefault.address & ~(h->ps - 1);
    int64_t done = 0;
    int e = 0;
    size_t idx = (size_t)((a - (uint64_t)(uintptr_t)h->base) / h->ps);
    switch (h->action) {
    case CT_H_COPY:
        if (a < (uintptr_t)h->base || idx >= h->npages) return cuffd_wake(h->uffd, a, h->ps);
        e = cuffd_copy(h->uffd, a, (uint64_t)(uintptr_t)(h->src + idx * h->ps), h->ps, 0, &done);
        break;
    case CT_H_ZERO: e = cuffd_zeropage(h->uffd, a, h->ps, 0, &done); break;
    case CT_H_CONTINUE: e = cuffd_continue(h->uffd, a, h->ps, 0, &done); break;
    case CT_H_UNPROTECT: e = cuffd_writeprotect(h->uffd, a, h->ps, false, false); break;
    default: return 0;
    }
    if (e == -EEXIST) e = cuffd_wake(h->uffd, a, h->ps);
    return e;
}

static void *handler_main(void *arg) {
    struct ct_handler *h = arg;
    while (!atomic_load(&h->stop)) {
        int w = cuffd_wait_readable(h->uffd, 20);
        if (w <= 0) continue;
        struct uffd_msg m[16];
        ssize_t n = cuffd_read_msgs(h->uffd, m, 16);
        for (ssize_t i = 0; i < n; i++) {
            int k = atomic_load(&h->nlog);
            if (k < CT_MAX_LOG) h->log[k] = m[i];
            atomic_store(&h->nlog, k + 1);
            if (m[i].event != UFFD_EVENT_PAGEFAULT) continue;
            int e = handler_resolve(h, &m[i]);
            if (e < 0 && atomic_fetch_add(&h->errors, 1) == 0) h->first_err = e;
        }
    }
    return NULL;
}

int ct_handler_start(struct ct_handler *h, const struct ct_fix *f, int action) {
    memset(h, 0, sizeof *h);
    h->uffd = f->uffd;
    h->action = action;
    h->ps = f->ps;
    h->base = f->base;
    h->npages = f->npages;
    h->src = f->src;
    int e = pthread_create(&h->th, NULL, handler_main, h);
    return e ? -e : 0;
}

int ct_handler_stop(struct ct_handler *h) {
    atomic_store(&h->stop, 1);
    return ct_join(h->th, 2000);
}

bool ct_wait_flag(atomic_int *flag, int timeout_ms) {
    for (int i = 0; i < timeout_ms && !atomic_load(flag); i++) usleep(1000);
    return atomic_load(flag) != 0;
}

void *ct_fork_reader_main(void *arg) {
    struct ct_fork_reader *r = arg;
    atomic_store(&r->running, 1);
    r->got = ct_read_msg(r->uffd, &r->m, CT_WAIT_MS);
    return NULL;
}

bool ct_handler_wait(struct ct_handler *h, int n, int timeout_ms) {
    for (int i = 0; i < timeout_ms; i++) {
        if (atomic_load(&h->nlog) >= n) return true;
        usleep(1000);
    }
    return atomic_load(&h->nlog) >= n;
}

int ct_handler_faults(struct ct_handler *h, uint64_t all, uint64_t none) {
    int n = atomic_load(&h->nlog), c = 0;
    if (n > CT_MAX_LOG) n = CT_MAX_LOG;
    for (int i = 0; i < n; i++) {
        const struct uffd_msg *m = &h->log[i];
        if (m->event != UFFD_EVENT_PAGEFAULT) continue;
        uint64_t fl = m->arg.pagefault.flags;
        if ((fl & all) == all && !(fl & none)) c++;
    }
    return c;
}

long ct_smaps_kb(const void *addr, const char *key) {
    FILE *f = fopen("/proc/self/smaps", "re");
    if (!f) return -1;
    char line[512];
    int in = 0;
    long val = -1;
    size_t klen = strlen(key);
    uintptr_t a = (uintptr_t)addr;
    while (fgets(line, sizeof line, f)) {
        unsigned long s, e;
        if (sscanf(line, "%lx-%lx ", &s, &e) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            in = a >= s && a < e;
            continue;
        }
        if (in && !strncmp(line, key, klen) && line[klen] == ':') {
            val = strtol(line + klen + 1, NULL, 10);
            break;
        }
    }
    fclose(f);
    return val;
}

static char thread_state(pid_t tid) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", (int)tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return '?';
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return '?';
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    return p && p[1] == ' ' ? p[2] : '?';
}

bool ct_wait_blocked(const pid_t *tids, int n, int timeout_ms) {
    for (int ms = 0; ms <= timeout_ms; ms++) {
        int blocked = 0;
        for (int i = 0; i < n; i++) {
            char s = thread_state(tids[i]);
            blocked += s == 'S' || s == 'D';
        }
        if (blocked == n) return true;
        usleep(1000);
    }
    return false;
}
