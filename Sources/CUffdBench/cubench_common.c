// Thread placement, bounded joins and uffd setup shared by the kernels.
#include "cubench_internal.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

int cubench_ncpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

int cubench_cpu_for(int base, uint32_t i, bool spread) {
    if (base < 0) return -1;
    return spread ? (int)((uint32_t)base + i) % cubench_ncpus() : base % cubench_ncpus();
}

void cubench_pin(int cpu) {
    if (cpu >= 0) (void)cuffd_pin_self(cpu);
}

void cubench_pin_caller(int cpu, cpu_set_t *saved) {
    CPU_ZERO(saved);
    if (cpu < 0) return;
    pthread_getaffinity_np(pthread_self(), sizeof *saved, saved);
    cubench_pin(cpu);
}

void cubench_unpin_caller(int cpu, const cpu_set_t *saved) {
    if (cpu < 0) return;
    pthread_setaffinity_np(pthread_self(), sizeof *saved, saved);
}

int cubench_join_until(pthread_t t, const struct timespec *deadline) {
    int rc = pthread_timedjoin_np(t, NULL, deadline);
    return rc == 0 ? 0 : -rc;
}

int cubench_uffd_open(uint64_t wanted, uint64_t *granted) {
    // Probed here with the raw handshake: cuffd_probe reports requested & available, which is
    // empty for a probe that requests nothing.
    const int oflags = CUFFD_OPEN_NONBLOCK | CUFFD_OPEN_USER_MODE_ONLY | CUFFD_OPEN_ALLOW_KERNEL_FAULTS;
    uint64_t avail = 0, ioctls = 0;
    int probe = cuffd_open(oflags, NULL, NULL);
    if (probe < 0) return probe;
    int rc = cuffd_api_raw(probe, UFFD_API, 0, &avail, &ioctls);
    close(probe);
    if (rc < 0) return rc;
    if ((avail & wanted) != wanted) return -EOPNOTSUPP;
    int fd = cuffd_open(oflags, NULL, NULL);
    if (fd < 0) return fd;
    rc = cuffd_api(fd, wanted, granted, &ioctls);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    return fd;
}

void cubench_signal(int efd) {
    uint64_t one = 1;
    ssize_t n = write(efd, &one, sizeof one);
    (void)n;
}

// Holds the faulting threads until all of them exist; opened with GO, or ABORT when a thread
// could not be created (a barrier would leave the created ones waiting forever).
struct gate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int state; // 0 closed, 1 go, 2 abort
};

static bool gate_wait(struct gate *g) {
    pthread_mutex_lock(&g->mu);
    while (g->state == 0) pthread_cond_wait(&g->cv, &g->mu);
    bool go = g->state == 1;
    pthread_mutex_unlock(&g->mu);
    return go;
}

static void gate_open(struct gate *g, int state) {
    pthread_mutex_lock(&g->mu);
    g->state = state;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

struct toucher {
    pthread_t tid;
    char *base;
    uint64_t len;
    int cpu;
    bool write;
    struct gate *gate;
    uint64_t t0, t1;
    uint64_t sum;
};

static void *toucher_main(void *arg) {
    struct toucher *t = arg;
    cubench_pin(t->cpu);
    if (!gate_wait(t->gate)) return NULL;
    volatile char *p = (volatile char *)t->base;
    uint64_t sum = 0;
    t->t0 = cuffd_now_ns();
    if (t->write) {
        for (uint64_t off = 0; off < t->len; off += CUBENCH_PAGE) p[off] = 1;
    } else {
        for (uint64_t off = 0; off < t->len; off += CUBENCH_PAGE) sum += (uint8_t)p[off];
    }
    t->t1 = cuffd_now_ns();
    t->sum = sum;
    return NULL;
}

int cubench_run_touchers(char *base, uint64_t len, uint64_t granule, const struct cubench_placement *pl,
                         bool write, uint32_t timeout_ms, void (*unblock)(void *), void *unblock_ctx,
                         uint64_t *ns) {
    uint32_t n = pl->fault_threads ? pl->fault_threads : 1;
    if (n > CUBENCH_MAX_THREADS) return -EINVAL;
    if (granule < CUBENCH_PAGE) granule = CUBENCH_PAGE;
    uint64_t units = len / granule, per = units / n;
    if (per == 0) return -EINVAL;
    struct toucher t[CUBENCH_MAX_THREADS] = {0};
    struct gate gate = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER, .state = 0};
    uint32_t started = 0;
    int err = 0;
    for (uint32_t i = 0; i < n; i++) {
        t[i].base = base + (uint64_t)i * per * granule;
        t[i].len = (i == n - 1) ? len - (uint64_t)i * per * granule : per * granule;
        t[i].cpu = cubench_cpu_for(pl->fault_cpu, i, pl->spread_faults);
        t[i].write = write;
        t[i].gate = &gate;
        int rc = pthread_create(&t[i].tid, NULL, toucher_main, &t[i]);
        if (rc) {
            err = -rc;
            break;
        }
        started++;
    }
    if (started < n) {
        // Nothing was touched yet, so no thread is blocked on a fault: release and join them.
        gate_open(&gate, 2);
        for (uint32_t i = 0; i < started; i++) pthread_join(t[i].tid, NULL);
        return err;
    }
    gate_open(&gate, 1);
    struct timespec dl = cuffd_deadline_after_ms(timeout_ms ? timeout_ms : CUBENCH_DEFAULT_TIMEOUT_MS);
    uint32_t joined = 0;
    for (; joined < n; joined++) {
        if (cubench_join_until(t[joined].tid, &dl) != 0) break;
    }
    if (joined < n) {
        if (unblock) unblock(unblock_ctx);
        for (uint32_t i = joined; i < n; i++) pthread_join(t[i].tid, NULL);
        err = -ETIMEDOUT;
    }
    uint64_t lo = UINT64_MAX, hi = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (t[i].t0 < lo) lo = t[i].t0;
        if (t[i].t1 > hi) hi = t[i].t1;
    }
    *ns = hi > lo ? hi - lo : 0;
    return err;
}

uint64_t cubench_tlb_shootdowns(void) {
    FILE *f = fopen("/proc/interrupts", "re");
    if (!f) return 0;
    char line[4096];
    uint64_t total = 0;
    while (fgets(line, sizeof line, f)) {
        char *p = line;
        while (*p == ' ') p++;
        if (strncmp(p, "TLB:", 4) != 0) continue;
        p += 4;
        for (;;) {
            char *end;
            unsigned long long v = strtoull(p, &end, 10);
            if (end == p) break;
            total += v;
            p = end;
        }
        break;
    }
    fclose(f);
    return total;
}

int cubench_next_fault(int uffd, int stopfd, struct uffd_msg *m) {
    for (;;) {
        struct pollfd p[2] = {{.fd = uffd, .events = POLLIN}, {.fd = stopfd, .events = POLLIN}};
        int rc = poll(p, 2, 1000);
        if (rc < 0 && errno != EINTR) return -1;
        if (p[1].revents) return 0;
        if (!(p[0].revents & POLLIN)) continue;
        if (read(uffd, m, sizeof *m) != (ssize_t)sizeof *m) continue;
        if (m->event != UFFD_EVENT_PAGEFAULT) continue;
        return 1;
    }
}

int cubench_prime_memory(uint64_t bytes) {
    // Free page reporting (virtio-balloon, page_reporting_order 9 here) hands free 2 MiB blocks
    // idle for ~2 s back to the host; the next allocation of them takes host faults (2-8 us per
    // 4 KiB page instead of ~0.17 for a THP populate). Populating huge pages of the size about to
    // be allocated and freeing them at once puts that memory back into the guest's free lists,
    // warm, so the timed allocation that follows does not pay for the previous run's free.
    // It costs wall time (host faults now, when the memory was reported): 64 MiB of margin only.
    uint64_t len = (bytes + (64ull << 20) + CUBENCH_2M - 1) & ~(CUBENCH_2M - 1);
    char *m = cuffd_map_anon_aligned(len, CUBENCH_2M);
    if (!m) return -ENOMEM;
    (void)madvise(m, len, MADV_HUGEPAGE); // 4 KiB pages also warm the blocks: only slower
    int rc = madvise(m, len, MADV_POPULATE_WRITE) < 0 ? -errno : 0;
    munmap(m, len);
    return rc;
}
