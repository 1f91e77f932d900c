// Heap compaction under userfaultfd (the workload behind the UFFDIO_MOVE patch's claims).
//
// A from-space of 64-byte objects, about half of them live, is compacted into a to-space that
// is registered MISSING. The compacting thread fills to-space pages in order; mutator threads
// read random to-space objects meanwhile and fault on pages not filled yet; a handler thread
// compacts the faulting page on their behalf. Each page is claimed once (atomic state), so the
// compactor and the handler never fill the same page.
//   COPY:           compact into a scratch page, UFFDIO_COPY (the kernel allocates and copies)
//   MOVE fresh:     compact into an unpopulated pool page (first-touch allocation), UFFDIO_MOVE
//   MOVE recycled:  compact into a pool page populated before the run (recycled), UFFDIO_MOVE
// The compactor resolves runs of up to `batch_pages` consecutive pages per ioctl; the handler
// resolves the one page a mutator waits for.
#include "cubench_internal.h"

#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define OBJ 64u
#define OBJS_PER_PAGE (CUBENCH_PAGE / OBJ)

enum { PAGE_TODO = 0, PAGE_CLAIMED = 1, PAGE_DONE = 2 };

struct cctx {
    int uffd, stopfd;
    uint32_t mode;
    uint64_t pages;
    char *from, *to, *pool;
    const uint32_t *live;       // live object indices in compaction order
    _Atomic uint8_t *state;
    _Atomic uint64_t done_pages;
    _Atomic int stop_mutators;
    _Atomic int first_error;
    _Atomic uint64_t errors;
    uint64_t handler_pages, handler_faults;
    int handler_cpu;
};

static void fill_page(const struct cctx *c, uint64_t page, char *dst) {
    const uint32_t *ids = c->live + page * OBJS_PER_PAGE;
    for (uint32_t k = 0; k < OBJS_PER_PAGE; k++) memcpy(dst + k * OBJ, c->from + (uint64_t)ids[k] * OBJ, OBJ);
}

// Fills `n` claimed consecutive pages and resolves them with one ioctl (which wakes any mutator
// waiting on them). Partial progress continues; a failure leaves no mutator waiting.
static void compact_run(struct cctx *c, uint64_t first, uint64_t n, char *scratch) {
    bool copy = c->mode == CUBENCH_COMPACT_COPY;
    char *src = copy ? scratch : c->pool + first * CUBENCH_PAGE;
    for (uint64_t k = 0; k < n; k++) fill_page(c, first + k, src + k * CUBENCH_PAGE);
    uint64_t dst = (uint64_t)(uintptr_t)(c->to + first * CUBENCH_PAGE), len = n * CUBENCH_PAGE, done = 0;
    int e = 0;
    while (done < len) {
        int64_t progress;
        int rc;
        if (copy) {
            struct uffdio_copy a = {.dst = dst + done, .src = (uint64_t)(uintptr_t)src + done, .len = len - done};
            rc = ioctl(c->uffd, UFFDIO_COPY, &a);
            progress = a.copy;
        } else {
            struct uffdio_move a = {.dst = dst + done, .src = (uint64_t)(uintptr_t)src + done, .len = len - done};
            rc = ioctl(c->uffd, UFFDIO_MOVE, &a);
            progress = a.move;
        }
        if (rc == 0) break;
        e = errno;
        if (e == EAGAIN && progress > 0) {
            done += (uint64_t)progress;
            e = 0;
            continue;
        }
        break;
    }
    if (e) {
        int zero = 0;
        atomic_compare_exchange_strong(&c->first_error, &zero, e);
        atomic_fetch_add(&c->errors, 1);
        // Never leave a mutator waiting: a zero page at least (the checksum then tells).
        struct uffdio_zeropage z = {.range = {.start = dst + done, .len = len - done}};
        if (ioctl(c->uffd, UFFDIO_ZEROPAGE, &z) < 0) {
            struct uffdio_range r = {.start = dst + done, .len = len - done};
            ioctl(c->uffd, UFFDIO_WAKE, &r);
        }
    }
    for (uint64_t k = 0; k < n; k++) atomic_store_explicit(&c->state[first + k], PAGE_DONE, memory_order_release);
    atomic_fetch_add(&c->done_pages, n);
}

static bool claim(struct cctx *c, uint64_t page) {
    uint8_t todo = PAGE_TODO;
    return atomic_compare_exchange_strong(&c->state[page], &todo, PAGE_CLAIMED);
}

static void *handler_main(void *arg) {
    struct cctx *c = arg;
    cubench_pin(c->handler_cpu);
    char scratch[CUBENCH_PAGE] __attribute__((aligned(4096)));
    for (;;) {
        struct uffd_msg m;
        if (cubench_next_fault(c->uffd, c->stopfd, &m) <= 0) break;
        c->handler_faults++;
        uint64_t page = (m.arg.pagefault.address - (uint64_t)(uintptr_t)c->to) / CUBENCH_PAGE;
        if (page >= c->pages) continue;
        // Claimed by the compactor: its resolution wakes the mutator.
        if (claim(c, page)) {
            compact_run(c, page, 1, scratch);
            c->handler_pages++;
        }
    }
    return NULL;
}

struct mutator {
    pthread_t tid;
    struct cctx *c;
    int cpu;
    uint64_t seed, reads, sum;
};

static void *mutator_main(void *arg) {
    struct mutator *m = arg;
    struct cctx *c = m->c;
    cubench_pin(m->cpu);
    uint64_t x = m->seed | 1, reads = 0, sum = 0;
    uint64_t nobj = c->pages * OBJS_PER_PAGE;
    while (!atomic_load_explicit(&c->stop_mutators, memory_order_relaxed)) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        sum += *(volatile uint64_t *)(c->to + (x % nobj) * OBJ);
        reads++;
    }
    m->reads = reads;
    m->sum = sum;
    return NULL;
}

int cubench_compaction(const struct cubench_compact_params *p, struct cubench_compact_result *out) {
    memset(out, 0, sizeof *out);
    if (p->mode > CUBENCH_COMPACT_MOVE_RECYCLED || p->mutators > CUBENCH_MAX_THREADS || p->to_pages == 0)
        return -EINVAL;
    uint64_t pages = p->to_pages, len = pages * CUBENCH_PAGE;
    uint64_t batch = p->batch_pages ? p->batch_pages : 1, compactor_ioctls = 0;
    if (batch > 512) return -EINVAL;
    uint64_t from_len = 2 * len, from_objs = from_len / OBJ, live_objs = pages * OBJS_PER_PAGE;
    struct cctx c = {.uffd = -1, .stopfd = -1, .mode = p->mode, .pages = pages, .handler_cpu = p->handler_cpu};
    uint32_t *live = NULL;
    int rc = 0;
    pthread_t handler;
    bool handler_started = false;
    struct mutator mut[CUBENCH_MAX_THREADS];
    uint32_t nmut = 0;

    c.from = mmap(NULL, from_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    c.to = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    c.pool = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    live = malloc(live_objs * sizeof *live);
    c.state = calloc(pages, 1);
    if (c.from == MAP_FAILED || c.to == MAP_FAILED || c.pool == MAP_FAILED || !live || !c.state) {
        rc = -ENOMEM;
        goto out;
    }
    c.live = live;
    madvise(c.to, len, MADV_NOHUGEPAGE);
    // MOVE needs exclusive 4 KiB source pages: no fork sharing, no THP to split.
    madvise(c.pool, len, MADV_DONTFORK);
    madvise(c.pool, len, MADV_NOHUGEPAGE);
    if (p->mode == CUBENCH_COMPACT_MOVE_RECYCLED && madvise(c.pool, len, MADV_POPULATE_WRITE) < 0) {
        rc = -errno;
        goto out;
    }
    // The marking result: every object carries its index + 1; the live set is a deterministic
    // ~50% pick, cut at exactly the objects that fill the to-space.
    uint64_t expected = 0, n = 0, x = 0x9e3779b97f4a7c15ull;
    for (uint64_t i = 0; i < from_objs; i++) {
        *(uint64_t *)(c.from + i * OBJ) = i + 1;
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        if (n < live_objs && ((x & 1) || from_objs - i <= live_objs - n)) {
            live[n++] = (uint32_t)i;
            expected += i + 1;
        }
    }
    out->expected = expected;

    uint64_t granted = 0;
    rc = cubench_uffd_open(p->mode == CUBENCH_COMPACT_COPY ? 0 : UFFD_FEATURE_MOVE, &granted);
    if (rc < 0) goto out;
    c.uffd = rc;
    rc = cuffd_register(c.uffd, (uint64_t)(uintptr_t)c.to, len, UFFDIO_REGISTER_MODE_MISSING, NULL);
    if (rc < 0) goto out;
    c.stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (c.stopfd < 0) { rc = -errno; goto out; }
    if ((rc = -pthread_create(&handler, NULL, handler_main, &c)) < 0) goto out;
    handler_started = true;
    for (; nmut < p->mutators; nmut++) {
        mut[nmut] = (struct mutator){.c = &c, .cpu = cubench_cpu_for(p->mutator_cpu, nmut, true),
                                     .seed = 0x2545f4914f6cdd1dull * (nmut + 1)};
        if ((rc = -pthread_create(&mut[nmut].tid, NULL, mutator_main, &mut[nmut])) < 0) goto stop;
    }

    {
        cpu_set_t saved;
        cubench_pin_caller(p->compactor_cpu, &saved);
        // COPY mode: the first `batch` pool pages are the reused, populated scratch buffer.
        char *scratch = c.pool;
        if (p->mode == CUBENCH_COMPACT_COPY) memset(scratch, 0, batch * CUBENCH_PAGE);
        uint64_t tlb0 = cubench_tlb_shootdowns();
        uint64_t t0 = cuffd_now_ns();
        for (uint64_t pg = 0; pg < pages;) {
            uint64_t n = 0;
            while (n < batch && pg + n < pages && claim(&c, pg + n)) n++;
            if (n) {
                compact_run(&c, pg, n, scratch);
                compactor_ioctls++;
                pg += n;
            } else {
                pg++; // the handler has it
            }
        }
        // Pages the handler claimed count too: compaction ends when every page is filled.
        uint64_t deadline = t0 + (uint64_t)(p->timeout_ms ? p->timeout_ms : CUBENCH_DEFAULT_TIMEOUT_MS) * 1000000ull;
        while (atomic_load(&c.done_pages) < pages) {
            if (cuffd_now_ns() > deadline) { rc = -ETIMEDOUT; break; }
            sched_yield();
        }
        out->compactor_ns = cuffd_now_ns() - t0;
        out->tlb_shootdowns = cubench_tlb_shootdowns() - tlb0;
        cubench_unpin_caller(p->compactor_cpu, &saved);
    }
stop:
    atomic_store(&c.stop_mutators, 1);
    if (rc == -ETIMEDOUT) {
        // Stop the handler first; unregistering wakes any mutator still blocked.
        cubench_signal(c.stopfd);
        pthread_join(handler, NULL);
        handler_started = false;
        cuffd_unregister(c.uffd, (uint64_t)(uintptr_t)c.to, len);
    }
    for (uint32_t i = 0; i < nmut; i++) {
        pthread_join(mut[i].tid, NULL);
        out->mutator_reads += mut[i].reads;
    }
    if (handler_started) {
        cubench_signal(c.stopfd);
        pthread_join(handler, NULL);
    }
    out->pages = atomic_load(&c.done_pages);
    out->handler_pages = c.handler_pages;
    out->compactor_ioctls = compactor_ioctls;
    out->resolve_errors = atomic_load(&c.errors);
    out->first_error = atomic_load(&c.first_error);
    out->mutator_faults = c.handler_faults;
    if (rc == 0) {
        uint64_t sum = 0;
        for (uint64_t i = 0; i < live_objs; i++) sum += *(volatile uint64_t *)(c.to + i * OBJ);
        out->checksum = sum;
        if (atomic_load(&c.first_error)) rc = -atomic_load(&c.first_error);
        else if (sum != expected) rc = -EILSEQ;
    }
out:
    if (c.uffd >= 0) close(c.uffd);
    if (c.stopfd >= 0) close(c.stopfd);
    if (c.from != MAP_FAILED && c.from) munmap(c.from, from_len);
    if (c.to != MAP_FAILED && c.to) munmap(c.to, len);
    if (c.pool != MAP_FAILED && c.pool) munmap(c.pool, len);
    free(live);
    free((void *)c.state);
    return rc;
}
