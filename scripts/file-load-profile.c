// One lazy-file-load mode of the benchmark, run N times in a process of its own, so that
// `perf record -a` sees that mode and nothing else (uffdctl bench always runs a row's baselines
// too). Built and driven by scripts/file-load-profile.sh.
//
//   file-load-profile FILE BYTES MODE RUNS
//   MODE: pread | fresh | fresh-2t | install | install-nofill | install-mapfill | uffd, or create
//   (writes FILE with the benchmark's tagged data, BYTES long)
// NO_PRIME=1 in the environment skips the priming; PERF_CTL_FIFO and PERF_ACK_FIFO (perf record
// --control fifo:CTL,ACK) make perf count only cubench_file_load, not the priming, which runs
// here before it; SLEEP_MS=N sleeps N ms before each run (freed
// memory idle for ~2 s is handed back to the host by free page reporting). Prints one line per run: mode, ns per 4 KiB page; exits non-zero on the first failed run.
#include "CUffdBench.h"

#include <errno.h>
#include <stdbool.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

// "enable" / "disable" to perf's control fifo, then waits for its ack. No-op without the fifos.
static void perf_ctl(const char *cmd) {
    const char *c = getenv("PERF_CTL_FIFO"), *a = getenv("PERF_ACK_FIFO");
    if (!c || !a) return;
    int fd = open(c, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return;
    ssize_t w = write(fd, cmd, strlen(cmd));
    close(fd);
    int af = open(a, O_RDONLY | O_CLOEXEC);
    if (af < 0 || w < 0) {
        if (af >= 0) close(af);
        return;
    }
    char buf[16];
    ssize_t n = read(af, buf, sizeof buf);
    (void)n;
    close(af);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s FILE BYTES MODE RUNS\n", argv[0]);
        return 2;
    }
    struct cubench_load_params p = {.path = argv[1], .bytes = strtoull(argv[2], NULL, 0), .window = 2u << 20,
                                    .handler_cpu = 0, .fault_cpu = 0, .filler_cpu = 1, .threads = 1};
    const char *m = argv[3];
    if (!strcmp(m, "create")) {
        int rc = cubench_file_create(argv[1], p.bytes);
        if (rc < 0) fprintf(stderr, "creating %s: %s\n", argv[1], strerror(-rc));
        return rc < 0;
    }
    if (!strcmp(m, "pread")) p.mode = CUBENCH_LOAD_PREAD;
    else if (!strcmp(m, "fresh")) p.mode = CUBENCH_LOAD_PREAD_FRESH;
    else if (!strcmp(m, "fresh-2t")) p.mode = CUBENCH_LOAD_PREAD_FRESH, p.threads = 2;
    else if (!strcmp(m, "install")) p.mode = CUBENCH_LOAD_INSTALL, p.fillers = 1;
    else if (!strcmp(m, "install-nofill")) p.mode = CUBENCH_LOAD_INSTALL;
    else if (!strcmp(m, "install-mapfill")) p.mode = CUBENCH_LOAD_INSTALL, p.fillers = 1, p.fill_mapped = 1;
    else if (!strcmp(m, "uffd")) p.mode = CUBENCH_LOAD_UFFD;
    else {
        fprintf(stderr, "unknown mode %s: pread, fresh, fresh-2t, install, install-nofill, install-mapfill, uffd\n", m);
        return 2;
    }
    bool prime = getenv("NO_PRIME") == NULL;
    p.no_prime = 1; // primed here, outside what perf counts
    int runs = atoi(argv[4]);
    if (p.bytes == 0 || runs <= 0) {
        fprintf(stderr, "BYTES and RUNS must be positive\n");
        return 2;
    }
    const char *sl = getenv("SLEEP_MS");
    unsigned sleep_ms = sl ? (unsigned)strtoul(sl, NULL, 10) : 0;
    for (int i = 0; i < runs; i++) {
        if (sleep_ms) usleep(sleep_ms * 1000u);
        perf_ctl("disable\n");
        if (prime && cubench_prime_memory(p.bytes) < 0) {
            fprintf(stderr, "priming %llu bytes failed\n", (unsigned long long)p.bytes);
            return 1;
        }
        perf_ctl("enable\n");
        struct cubench_result r;
        int rc = cubench_file_load(&p, &r);
        perf_ctl("disable\n");
        if (rc < 0) {
            fprintf(stderr, "%s: run %d: %s\n", m, i, strerror(-rc));
            return 1;
        }
        printf("%s %.0f ns/page\n", m, (double)r.ns / (double)r.pages);
    }
    return 0;
}
