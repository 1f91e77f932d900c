// Candidate fixes for the serve path on tmpfs (BENCHMARKS.md, "Issue 14: serve path and cold
// reads"): UFFDIO_COPY of 2 MiB windows into a MISSING anon region (MADV_NOHUGEPAGE), handler
// and reader pinned to CPU 0, from: 0 populated anon memory (bulk.copy-2m), 1 a fresh
// MAP_PRIVATE mapping of the file (mapcopy-2m), 2 the same + MADV_POPULATE_READ of each window
// in the handler before the COPY, 3 MAP_PRIVATE|MAP_POPULATE (set-up cost printed apart),
// 4 fresh MAP_SHARED, 5 MAP_SHARED|MAP_POPULATE. All modes run in one process, interleaved per
// round, so memory freed by one run is reused warm by the next (free page reporting).
// Build: gcc -O2 -o /tmp/mapcopy-exp scripts/mapcopy-source-exp.c -lpthread
// Run:   /tmp/mapcopy-exp /dev/shm/FILE ROUNDS 0 1 2 3 4 5   (mode 0 first: ratios use it)
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#define W (2u << 20)
static uint64_t now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000ull + t.tv_nsec; }
static void pin(int c) { cpu_set_t s; CPU_ZERO(&s); CPU_SET(c, &s); pthread_setaffinity_np(pthread_self(), sizeof s, &s); }
struct ctx { int uffd; char *region, *src; uint64_t len; int mode; volatile int stop; uint64_t popns; };
static void *handler(void *a) {
    struct ctx *c = a; pin(0);
    for (;;) {
        struct pollfd p = {.fd = c->uffd, .events = POLLIN};
        int r = poll(&p, 1, 100);
        if (c->stop) break;
        if (r <= 0) continue;
        struct uffd_msg m;
        if (read(c->uffd, &m, sizeof m) != sizeof m) continue;
        uint64_t off = (m.arg.pagefault.address - (uint64_t)c->region) & ~(uint64_t)(W - 1);
        char *s = c->src + off;
        if (c->mode == 2) { uint64_t t = now(); madvise(s, W, MADV_POPULATE_READ); c->popns += now() - t; }
        struct uffdio_copy cp = {.dst = (uint64_t)c->region + off, .src = (uint64_t)s, .len = W};
        if (ioctl(c->uffd, UFFDIO_COPY, &cp) < 0 && errno != EEXIST) { perror("copy"); exit(1); }
    }
    return NULL;
}
static const char *names[] = {"anon-src (bulk.copy-2m)", "fresh MAP_PRIVATE (mapcopy)", "+POPULATE_READ/window", "MAP_POPULATE up front", "fresh MAP_SHARED", "MAP_SHARED|MAP_POPULATE"};
int main(int argc, char **argv) {
    const char *path = argv[1]; int rounds = atoi(argv[2]); int nm = argc - 3;
    int fd = open(path, O_RDONLY); uint64_t len = lseek(fd, 0, SEEK_END); uint64_t pages = len / 4096;
    char *anon = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    madvise(anon, len, MADV_NOHUGEPAGE); madvise(anon, len, MADV_POPULATE_WRITE); memset(anon, 0x5a, len);
    pin(0);
    double best[8], all[8][64]; for (int i = 0; i < 8; i++) best[i] = 1e18;
    for (int r = 0; r < rounds; r++) for (int k = 0; k < nm; k++) {
        int mode = atoi(argv[3 + k]);
        uint64_t t0 = now(); char *src;
        if (mode == 0) src = anon;
        else if (mode == 3) src = mmap(NULL, len, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
        else if (mode == 4) src = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
        else if (mode == 5) src = mmap(NULL, len, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
        else src = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
        uint64_t setup = now() - t0;
        struct ctx c = {.src = src, .len = len, .mode = mode};
        c.region = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        madvise(c.region, len, MADV_NOHUGEPAGE);
        c.uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        struct uffdio_api api = {.api = UFFD_API}; ioctl(c.uffd, UFFDIO_API, &api);
        struct uffdio_register reg = {.range = {(uint64_t)c.region, len}, .mode = UFFDIO_REGISTER_MODE_MISSING};
        if (ioctl(c.uffd, UFFDIO_REGISTER, &reg)) { perror("reg"); return 1; }
        pthread_t h; pthread_create(&h, NULL, handler, &c);
        uint64_t sum = 0; t0 = now();
        for (uint64_t o = 0; o < len; o += 4096) sum += *(volatile uint64_t *)(c.region + o);
        double ns = (double)(now() - t0) / pages;
        c.stop = 1; pthread_join(h, NULL); close(c.uffd);
        munmap(c.region, len); if (mode) munmap(src, len);
        all[mode][r] = ns; if (ns < best[mode]) best[mode] = ns;
        printf("round %d mode %d %-30s %6.0f ns/page  setup %5.0f ns/page  populate-in-handler %4.0f ns/page\n", r, mode, names[mode], ns, (double)setup / pages, (double)c.popns / pages);
    }
    for (int k = 0; k < nm; k++) { int m = atoi(argv[3 + k]); double *v = all[m]; for (int i = 0; i < rounds; i++) for (int j = i + 1; j < rounds; j++) if (v[j] < v[i]) { double t = v[i]; v[i] = v[j]; v[j] = t; }
        printf("SUMMARY mode %d %-30s min %6.0f median %6.0f  x min vs mode0 %.2f  x med %.2f\n", m, names[m], best[m], v[rounds / 2], best[m] / best[0], v[rounds / 2] / all[0][rounds / 2]); }
    return 0;
}
