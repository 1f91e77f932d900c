// Window installer: whole windows read into huge-page donors and moved into place, pipelined
// by prefetch threads. See cuffd_install.h for the contract.
#include "CUffd.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

enum { W_EMPTY = 0, W_CLAIMED = 1, W_INSTALLED = 2 };
enum { QUEUE_CAP = 256, MAX_FILLERS = 4, MAX_SLOTS = 64 };

struct cuffd_installer {
    struct cuffd_installer_config cfg;
    uint64_t page, nwin;
    _Atomic uint8_t *state;
    char *donors;          // slots * window bytes, window-aligned
    char *scratch;         // slots * page bytes (one-page copies for stale faults)
    _Atomic uint64_t free_slots;
    // Counters: relaxed atomics (several installing threads).
    _Atomic uint64_t moved, copied, fallbacks, prefetched, joined, stale, failed, bytes;
    _Atomic uint64_t alloc_ns, fill_ns, place_ns; // where an install's time goes
    // Prefetch queue (fillers only).
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t queue[QUEUE_CAP];
    uint32_t qhead, qlen;
    bool stopping;         // under mu: no more prefetching (fillers exit, nothing is queued)
    bool reaped;           // the fillers were joined (only the owner's stop/destroy touch it)
    uint32_t nthreads;     // fillers started; fixed once create returns (read by handler threads)
    pthread_t threads[MAX_FILLERS];
};

static uint64_t add(_Atomic uint64_t *c, uint64_t n) {
    return atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

static int take_slot(struct cuffd_installer *in) {
    for (;;) {
        uint64_t f = atomic_load_explicit(&in->free_slots, memory_order_acquire);
        if (!f) {
            // More installers at once than donors: wait for one (an install takes a window's
            // read time at most).
            sched_yield();
            continue;
        }
        int s = __builtin_ctzll(f);
        if (atomic_compare_exchange_weak_explicit(&in->free_slots, &f, f & ~(1ull << s),
                                                  memory_order_acquire, memory_order_relaxed))
            return s;
    }
}

static void give_slot(struct cuffd_installer *in, int s) {
    atomic_fetch_or_explicit(&in->free_slots, 1ull << s, memory_order_release);
}

// COPY [dst+off, dst+len) from src+off, continuing past pages that exist (EEXIST) or that a
// window-wide copy cannot reach (ENOENT: a VMA boundary inside the window, e.g. after mprotect
// of one page; that page alone may still be copyable). Returns 0, or the first other -errno
// (EAGAIN: an event is unread; ESRCH: the process is gone; ...) with *done the bytes copied.
static int copy_rest(struct cuffd_installer *in, uint64_t dst, const char *src, uint64_t off,
                     uint64_t len, uint64_t *done) {
    int fd = in->cfg.uffd;
    *done = 0;
    while (off < len) {
        int64_t d = 0;
        int rc = cuffd_copy(fd, dst + off, (uint64_t)(uintptr_t)(src + off), len - off, 0, &d);
        off += (uint64_t)d;
        *done += (uint64_t)d;
        if (rc == 0) return 0;
        if (rc == -EEXIST) {
            cuffd_wake(fd, dst + off, in->page);
            off += in->page;
            continue;
        }
        if (rc == -ENOENT) {
            // The range crosses out of the registered VMA: try this page alone, else skip it.
            d = 0;
            rc = cuffd_copy(fd, dst + off, (uint64_t)(uintptr_t)(src + off), in->page, 0, &d);
            if (rc == 0) *done += in->page;
            else if (rc != -EEXIST && rc != -ENOENT) return rc;
            off += in->page;
            continue;
        }
        return rc;
    }
    return 0;
}

// Installs window w, which the caller claimed (state CLAIMED). Leaves it INSTALLED, or EMPTY
// on failure; wakes the window either way.
static int install_claimed(struct cuffd_installer *in, uint64_t w) {
    const struct cuffd_installer_config *c = &in->cfg;
    uint64_t win = c->window, off = w * win;
    uint64_t dst = c->start + off, len = c->len - off < win ? c->len - off : win;
    int s = take_slot(in);
    char *donor = in->donors + (uint64_t)s * win;
    bool dirty = false; // the donor keeps pages (a fallback): drop them so the next fill gets a huge page
    // The donor's memory first (a zeroed huge page where THP allows it), then the bytes: two
    // steps so the counters can tell allocation from reading.
    uint64_t t0 = cuffd_now_ns();
    (void)madvise(donor, win, MADV_POPULATE_WRITE);
    uint64_t t1 = cuffd_now_ns();
    int rc = c->fill(c->ctx, off, donor, len);
    uint64_t t2 = cuffd_now_ns();
    add(&in->alloc_ns, t1 - t0);
    add(&in->fill_ns, t2 - t1);
    uint64_t placed = 0; // bytes moved or copied (pages that were there already not counted)
    if (rc == 0) {
        uint64_t moved = 0;
        if (!(c->flags & CUFFD_INSTALL_COPY) && len == win) {
            int64_t d = 0;
            rc = cuffd_move(c->uffd, dst, (uint64_t)(uintptr_t)donor, len, 0, &d);
            moved = (uint64_t)d;
            if (rc == 0) {
                add(&in->moved, 1);
                placed = len;
            }
        } else {
            rc = 1; // not tried
        }
        if (rc != 0) {
            // The move failed or was not tried: copy what it did not move (EAGAIN aside: an
            // event is unread, nothing can progress; the threads re-fault after it is read).
            if (rc < 0) add(&in->fallbacks, 1);
            uint64_t done = 0;
            rc = rc == -EAGAIN ? -EAGAIN : copy_rest(in, dst, donor, moved, len, &done);
            if (rc == 0) add(&in->copied, 1);
            placed = moved + done;
            // A move that failed leaves pages in the donor: drop them, so the next fill gets a
            // whole huge page to move. In COPY mode the donor is a reused buffer, kept (hot).
            dirty = !(c->flags & CUFFD_INSTALL_COPY);
        }
    }
    add(&in->place_ns, cuffd_now_ns() - t2);
    if (rc == 0) {
        add(&in->bytes, placed);
        atomic_store_explicit(&in->state[w], W_INSTALLED, memory_order_release);
    } else {
        if (rc != -EAGAIN) add(&in->failed, 1);
        atomic_store_explicit(&in->state[w], W_EMPTY, memory_order_release);
        dirty = true;
    }
    // Whatever happened, no thread waiting on this window stays asleep (a fault that joined
    // this install returned at once): the successful ioctls woke their ranges; wake it all.
    if (rc != 0 || dirty) cuffd_wake(c->uffd, dst, len);
    if (dirty) madvise(donor, win, MADV_DONTNEED);
    give_slot(in, s);
    return rc;
}

static void request_prefetch(struct cuffd_installer *in, uint64_t w) {
    if (!in->nthreads) return;
    uint64_t last = w + in->cfg.ahead;
    if (last >= in->nwin) last = in->nwin - 1;
    bool any = false;
    pthread_mutex_lock(&in->mu);
    if (in->stopping) last = w; // stopped: queue nothing
    for (uint64_t v = w + 1; v <= last && in->qlen < QUEUE_CAP; v++) {
        if (atomic_load_explicit(&in->state[v], memory_order_relaxed) != W_EMPTY) continue;
        in->queue[(in->qhead + in->qlen++) % QUEUE_CAP] = v;
        any = true;
    }
    pthread_mutex_unlock(&in->mu);
    if (any) pthread_cond_broadcast(&in->cv);
}

int cuffd_installer_prefetch(struct cuffd_installer *in, uint64_t index) {
    if (index >= in->nwin) return -EINVAL;
    uint8_t e = W_EMPTY;
    if (!atomic_compare_exchange_strong_explicit(&in->state[index], &e, W_CLAIMED, memory_order_acq_rel,
                                                 memory_order_relaxed))
        return 1;
    int rc = install_claimed(in, index);
    if (rc == 0) add(&in->prefetched, 1);
    return rc;
}

// Takes one queued window, if any, and installs it. 1 when there was one.
static int help_one(struct cuffd_installer *in) {
    pthread_mutex_lock(&in->mu);
    if (in->stopping || in->qlen == 0) {
        pthread_mutex_unlock(&in->mu);
        return 0;
    }
    uint64_t w = in->queue[in->qhead];
    in->qhead = (in->qhead + 1) % QUEUE_CAP;
    in->qlen--;
    pthread_mutex_unlock(&in->mu);
    (void)cuffd_installer_prefetch(in, w);
    return 1;
}

static void *filler_main(void *arg) {
    struct cuffd_installer *in = arg;
    for (;;) {
        pthread_mutex_lock(&in->mu);
        while (!in->stopping && in->qlen == 0) pthread_cond_wait(&in->cv, &in->mu);
        if (in->stopping) {
            pthread_mutex_unlock(&in->mu);
            return NULL;
        }
        uint64_t w = in->queue[in->qhead];
        in->qhead = (in->qhead + 1) % QUEUE_CAP;
        in->qlen--;
        pthread_mutex_unlock(&in->mu);
        (void)cuffd_installer_prefetch(in, w);
    }
}

// One page for a fault on an installed window (the page was dropped since, or the fault raced
// the install and its message was read after it): copy it from the image; EEXIST = it is there.
static int install_page(struct cuffd_installer *in, uint64_t addr) {
    const struct cuffd_installer_config *c = &in->cfg;
    uint64_t page = addr & ~(in->page - 1);
    int s = take_slot(in);
    char *buf = in->scratch + (uint64_t)s * in->page;
    int rc = c->fill(c->ctx, page - c->start, buf, in->page);
    if (rc == 0) {
        int64_t d = 0;
        rc = cuffd_copy(c->uffd, page, (uint64_t)(uintptr_t)buf, in->page, 0, &d);
        if (rc == -EEXIST) rc = cuffd_wake(c->uffd, page, in->page);
        if (rc == 0) add(&in->bytes, (uint64_t)d);
    }
    give_slot(in, s);
    return rc == -EAGAIN ? 0 : rc; // EAGAIN: the thread re-faults after the event is read
}

int cuffd_installer_install(struct cuffd_installer *in, uint64_t addr) {
    const struct cuffd_installer_config *c = &in->cfg;
    if (addr < c->start || addr - c->start >= c->len) return -EINVAL;
    uint64_t w = (addr - c->start) / c->window;
    // A stream: the window before this one is in (or going in); keep the fillers ahead of it.
    if (w > 0 && atomic_load_explicit(&in->state[w - 1], memory_order_relaxed) != W_EMPTY)
        request_prefetch(in, w);
    for (;;) {
        uint8_t s = atomic_load_explicit(&in->state[w], memory_order_acquire);
        if (s == W_CLAIMED) {
            // Another thread installs it and wakes the window when done, whatever happens.
            // Meanwhile this (handler) thread has nothing to do: it installs the next queued
            // window, so the fault path and the fillers read windows in parallel.
            add(&in->joined, 1);
            if (in->nthreads) help_one(in);
            return 0;
        }
        if (s == W_INSTALLED) {
            add(&in->stale, 1);
            return install_page(in, addr);
        }
        if (atomic_compare_exchange_weak_explicit(&in->state[w], &s, W_CLAIMED, memory_order_acq_rel,
                                                  memory_order_relaxed)) {
            int rc = install_claimed(in, w);
            return rc == -EAGAIN ? 0 : rc;
        }
    }
}

void cuffd_installer_forget(struct cuffd_installer *in, uint64_t start, uint64_t len) {
    const struct cuffd_installer_config *c = &in->cfg;
    uint64_t end = start + len;
    if (end <= c->start || start >= c->start + c->len || !len) return;
    if (start < c->start) start = c->start;
    if (end > c->start + c->len) end = c->start + c->len;
    for (uint64_t w = (start - c->start) / c->window; w <= (end - 1 - c->start) / c->window; w++) {
        uint8_t s = W_INSTALLED;
        atomic_compare_exchange_strong_explicit(&in->state[w], &s, W_EMPTY, memory_order_acq_rel,
                                                memory_order_relaxed);
    }
}

void cuffd_installer_stop(struct cuffd_installer *in) {
    pthread_mutex_lock(&in->mu);
    in->stopping = true;
    pthread_mutex_unlock(&in->mu);
    pthread_cond_broadcast(&in->cv);
    // nthreads stays as it is: handler threads still installing read it (TSan found the old
    // `nthreads = 0` here racing request_prefetch); `stopping`, read under mu, is what ends
    // prefetching for them.
    if (in->reaped) return;
    for (uint32_t i = 0; i < in->nthreads; i++) pthread_join(in->threads[i], NULL);
    in->reaped = true;
}

void cuffd_installer_stats(const struct cuffd_installer *in, struct cuffd_installer_stats *o) {
    struct cuffd_installer *m = (struct cuffd_installer *)in;
    o->moved = atomic_load_explicit(&m->moved, memory_order_relaxed);
    o->copied = atomic_load_explicit(&m->copied, memory_order_relaxed);
    o->fallbacks = atomic_load_explicit(&m->fallbacks, memory_order_relaxed);
    o->prefetched = atomic_load_explicit(&m->prefetched, memory_order_relaxed);
    o->joined = atomic_load_explicit(&m->joined, memory_order_relaxed);
    o->stale = atomic_load_explicit(&m->stale, memory_order_relaxed);
    o->failed = atomic_load_explicit(&m->failed, memory_order_relaxed);
    o->bytes = atomic_load_explicit(&m->bytes, memory_order_relaxed);
    o->alloc_ns = atomic_load_explicit(&m->alloc_ns, memory_order_relaxed);
    o->fill_ns = atomic_load_explicit(&m->fill_ns, memory_order_relaxed);
    o->place_ns = atomic_load_explicit(&m->place_ns, memory_order_relaxed);
}

void cuffd_installer_destroy(struct cuffd_installer *in) {
    if (!in) return;
    cuffd_installer_stop(in);
    uint64_t slots = in->cfg.slots;
    if (in->donors) munmap(in->donors, slots * in->cfg.window);
    if (in->scratch) munmap(in->scratch, slots * in->page);
    free((void *)in->state);
    pthread_mutex_destroy(&in->mu);
    pthread_cond_destroy(&in->cv);
    free(in);
}

static void *filler_start(void *arg) {
    struct { struct cuffd_installer *in; int cpu; } *a = arg;
    struct cuffd_installer *in = a->in;
    int cpu = a->cpu;
    free(arg);
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    }
    return filler_main(in);
}

int cuffd_installer_create(const struct cuffd_installer_config *cfg, struct cuffd_installer **out) {
    *out = NULL;
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    struct cuffd_installer_config c = *cfg;
    if (!c.window) c.window = 2u << 20;
    if (!c.ahead) c.ahead = 8;
    if (c.fillers > MAX_FILLERS) c.fillers = MAX_FILLERS;
    if (!c.slots) c.slots = c.fillers + 4;
    if (c.slots > MAX_SLOTS) c.slots = MAX_SLOTS;
    if (!c.fill || c.window < page || (c.window & (c.window - 1)) || c.start % c.window || !c.len ||
        c.len % page)
        return -EINVAL;
    struct cuffd_installer *in = calloc(1, sizeof *in);
    if (!in) return -ENOMEM;
    in->cfg = c;
    in->page = page;
    in->nwin = (c.len + c.window - 1) / c.window;
    pthread_mutex_init(&in->mu, NULL);
    pthread_cond_init(&in->cv, NULL);
    in->state = calloc(in->nwin, 1);
    in->donors = cuffd_map_anon_aligned(c.slots * c.window, c.window);
    in->scratch = cuffd_map_anon_aligned(c.slots * page, page);
    if (!in->state || !in->donors || !in->scratch) {
        cuffd_installer_destroy(in);
        return -ENOMEM;
    }
    // A huge page per donor window where THP allows it; never shared with a fork child (MOVE
    // needs exclusive pages: EBUSY otherwise).
    madvise(in->donors, c.slots * c.window, MADV_HUGEPAGE);
    madvise(in->donors, c.slots * c.window, MADV_DONTFORK);
    atomic_store(&in->free_slots, c.slots == 64 ? ~0ull : (1ull << c.slots) - 1);
    for (uint32_t i = 0; i < c.fillers; i++) {
        struct { struct cuffd_installer *in; int cpu; } *a = malloc(sizeof *a);
        if (!a) break;
        a->in = in;
        a->cpu = c.filler_cpus[i];
        if (pthread_create(&in->threads[in->nthreads], NULL, filler_start, a) != 0) {
            free(a);
            break;
        }
        in->nthreads++;
    }
    if (in->nthreads < c.fillers) {
        cuffd_installer_destroy(in);
        return -EAGAIN;
    }
    *out = in;
    return 0;
}

int64_t cuffd_huge_bytes(uint64_t start, uint64_t len) {
    int fd = cuffd_pagemap_open_pid(0);
    if (fd < 0) return fd;
    int64_t n = cuffd_huge_bytes_fd(fd, start, len);
    close(fd);
    return n;
}

int cuffd_thp_available(int *madvised) {
    if (madvised) *madvised = 0;
    if (prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1) return 0;
    int fd = open("/sys/kernel/mm/transparent_hugepage/enabled", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    char buf[128] = {0};
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    if (strstr(buf, "[always]")) return 1;
    if (strstr(buf, "[madvise]")) {
        if (madvised) *madvised = 1;
        return 1;
    }
    return 0;
}

int cuffd_thp_eligible(uint64_t addr) {
    int madvised = 0;
    if (!cuffd_thp_available(&madvised)) return 0;
    FILE *f = fopen("/proc/self/smaps", "re");
    if (!f) return -errno;
    char *line = NULL;
    size_t cap = 0;
    bool inside = false;
    int verdict = -ENOENT;
    while (getline(&line, &cap, f) > 0) {
        unsigned long lo, hi;
        char c;
        // A VMA header: "lo-hi perms ..." (the field lines start with a capitalised name).
        if (sscanf(line, "%lx-%lx %c", &lo, &hi, &c) == 3 && strchr(line, '-') < strchr(line, ' ')) {
            inside = addr >= lo && addr < hi;
            continue;
        }
        if (inside && strncmp(line, "VmFlags:", 8) == 0) {
            bool nh = strstr(line, " nh") != NULL, hg = strstr(line, " hg") != NULL;
            verdict = !nh && (hg || !madvised);
            break;
        }
    }
    free(line);
    fclose(f);
    return verdict;
}

int cuffd_set_thp_disable(bool disable) {
    return prctl(PR_SET_THP_DISABLE, disable ? 1 : 0, 0, 0, 0) < 0 ? -errno : 0;
}
