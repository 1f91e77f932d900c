// Leases of default-size huge pages from vm.nr_hugepages, shared by every test process on the
// machine. Each lease adds its own pages to the pool and gives exactly those back: a saved
// absolute value, written back while another test run (another checkout, CI beside a developer's
// run) still used the pool, took that run's unreserved pages away (a hugetlb-private child's
// UFFDIO_COPY then failed with ENOMEM and its fault was never resolved). The read-modify-write of
// the sysctl is serialized across processes by flock on one lock file.
#include "ct.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/file.h>
#include <unistd.h>

#define NR_PATH "/proc/sys/vm/nr_hugepages"
#define LEASE_MAX 64

static pthread_mutex_t lease_mu = PTHREAD_MUTEX_INITIALIZER;
static long leased[LEASE_MAX]; // pages each open lease added, innermost last
static int depth;
static int reserve_err = 1;    // the last lease's outcome; 1: never tried

int ct_hugetlb_reserve_error(void) { return reserve_err; }

static long read_nr(void) {
    FILE *f = fopen(NR_PATH, "re");
    if (!f) return -errno;
    long v = -1;
    if (fscanf(f, "%ld", &v) != 1) v = -EIO;
    fclose(f);
    return v;
}

static int write_nr(long v) {
    FILE *f = fopen(NR_PATH, "we");
    if (!f) return -errno;
    int rc = fprintf(f, "%ld\n", v) < 0 ? -EIO : 0;
    if (fclose(f) != 0 && rc == 0) rc = -errno;
    return rc;
}

// Free huge pages nobody has reserved: what an unreserved allocation (a private mapping's child,
// a COW) can still get.
long ct_hugetlb_available(void) {
    FILE *f = fopen("/proc/meminfo", "re");
    if (!f) return -1;
    char line[128];
    long fr = -1, rsvd = 0, v;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "HugePages_Free: %ld", &v) == 1) fr = v;
        else if (sscanf(line, "HugePages_Rsvd: %ld", &v) == 1) rsvd = v;
    }
    fclose(f);
    return fr < 0 ? -1 : fr - rsvd;
}

// The machine-wide lock, held only around a change of the sysctl. /run/lock is root's on Debian;
// /tmp where it is missing. Tests/Firecracker/fcrig.py takes the same lock.
static int lock_pool(void) {
    int fd = open("/run/lock/uffdkit-hugetlb.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) fd = open("/tmp/uffdkit-hugetlb.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return -errno;
    while (flock(fd, LOCK_EX) != 0)
        if (errno != EINTR) {
            int e = -errno;
            close(fd);
            return e;
        }
    return fd;
}

// Adds `delta` (may be negative) to nr_hugepages under the lock; *granted is what the pool grew
// or shrank by (the kernel may grant less when memory is fragmented).
static int adjust(long delta, long *granted) {
    *granted = 0;
    int fd = lock_pool();
    if (fd < 0) return fd;
    long old = read_nr();
    int e = old < 0 ? (int)old : write_nr(old + delta < 0 ? 0 : old + delta);
    long now = e == 0 ? read_nr() : old;
    if (e == 0 && now >= 0) *granted = now - old;
    close(fd);
    return e;
}

void ct_hugetlb_forget_leases(void) {
    depth = 0;
    reserve_err = 1;
}

int cuffd_test_hugetlb_reserve(long pages) {
    pthread_mutex_lock(&lease_mu);
    long granted = 0;
    int e = adjust(pages, &granted);
    if (depth < LEASE_MAX) leased[depth] = granted;
    depth++;
    if (e == 0 && ct_hugetlb_available() < pages) e = -ENOMEM;
    reserve_err = e;
    pthread_mutex_unlock(&lease_mu);
    return e;
}

void cuffd_test_hugetlb_restore(void) {
    pthread_mutex_lock(&lease_mu);
    if (depth > 0) {
        depth--;
        long give = depth < LEASE_MAX ? leased[depth] : 0, granted;
        // Pages still mapped somewhere stay as surplus until they are freed: never below use.
        if (give > 0) (void)adjust(-give, &granted);
    }
    pthread_mutex_unlock(&lease_mu);
}
