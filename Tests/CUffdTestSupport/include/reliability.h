// C helpers for Tests/ReliabilityTests: running a scenario in a child process with a watchdog,
// catching SIGBUS/SIGSEGV on a faulting thread, the stress test's page-locking threads, and
// opening a userfaultfd as an unprivileged user.
#ifndef RELIABILITY_H
#define RELIABILITY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

// MARK: - Child processes

/// Runs `argv[0]` (argv NULL-terminated) in a new process group with `env_name=env_value`
/// added to the environment and `cwd` as its working directory (NULL: this process's), capturing stdout+stderr into `out` (the last `outlen-1` bytes are
/// kept, NUL-terminated). After `timeout_ms` the whole group is killed with SIGKILL.
/// Returns 0 when the child ended by itself (`*exit_code` = its status, or 128+signal when a
/// signal killed it), -ETIMEDOUT when the watchdog killed it, or -errno when it could not start.
/// Only async-signal-safe calls run between fork and exec.
int rel_run_child(const char *const *argv, const char *env_name, const char *env_value,
                  const char *cwd, int timeout_ms, char *out, size_t outlen, int *exit_code);

// MARK: - Faulting accesses that may raise a signal

enum rel_access_result {
    REL_ACCESS_OK = 0,
    REL_ACCESS_SIGBUS = 1,
    REL_ACCESS_SIGSEGV = 2,
};

/// Reads the 64-bit word at `addr` (8-byte aligned), catching SIGBUS and SIGSEGV raised by
/// this access on the calling thread (poisoned page, unmapped range). Returns a
/// rel_access_result; `*value` is set on REL_ACCESS_OK. Signals raised elsewhere keep their
/// default action. Handlers are installed on first use.
int rel_read_u64(const volatile uint64_t *addr, uint64_t *value);

/// Like rel_read_u64 but adds `delta` to the word (a write fault when the page is
/// write-protected); `*value` receives the new value.
int rel_add_u64(volatile uint64_t *addr, uint64_t delta, uint64_t *value);

// MARK: - Stress: page-locking threads (uffd-stress's locking threads)

/// Shared state of one stress run. Each page of the destination area holds, at offset 0, a
/// counter and at offset 8 the page's index; `expected` (a side array) is the counter each page
/// must hold; `locks` (a side array) serialises each page's read-check-increment.
struct rel_stress;

/// Makes the shared state for `npages` pages of `page_size`.
struct rel_stress *rel_stress_create(uint64_t npages, uint64_t page_size);
void rel_stress_destroy(struct rel_stress *s);

/// Writes index and counter 0 into every page of `area` (the first source area).
void rel_stress_init_area(struct rel_stress *s, void *area);

enum rel_stress_mode {
    REL_STRESS_SEQUENTIAL = 0, ///< each thread walks the pages from its own start
    REL_STRESS_RANDOM = 1,     ///< each thread picks pages at random
    REL_STRESS_RACING = 2,     ///< every thread walks the same page sequence: faults race
};

/// Starts `nthreads` locking threads on the destination `area` (one round). Each loops:
/// pick a page, lock it, read counter+index (faulting), compare with `expected`, increment
/// both, unlock. Returns 0 or -errno.
int rel_stress_start(struct rel_stress *s, void *area, int nthreads, int mode, uint64_t seed);

/// Stops the round's threads and joins them within `timeout_ms`. Returns 0, or -ETIMEDOUT
/// when a thread did not come back (it is blocked on a fault: the caller's watchdog case).
int rel_stress_stop(struct rel_stress *s, int timeout_ms);

/// Operations done so far (all rounds).
uint64_t rel_stress_ops(const struct rel_stress *s);

/// The first inconsistency a locking thread or rel_stress_verify saw ("" when none).
const char *rel_stress_error(const struct rel_stress *s);

/// Checks every page of `area` (the final data): index matches, counter equals `expected`,
/// and the sum of expected counters equals the operations done. Returns 0 or -1 (see
/// rel_stress_error).
int rel_stress_verify(struct rel_stress *s, const void *area);

// MARK: - Stress: blocking-read resolvers (uffd-stress's read mode)

/// `n` threads that each block in read(2) on the blocking `uffd` and answer MISSING faults in
/// [dst, dst+len) with UFFDIO_COPY from the same offset of `src` (protected with `wp`; EEXIST
/// wakes the range) and WP faults with an unprotect. NULL when no thread could start.
struct rel_resolvers;
struct rel_resolvers *rel_resolvers_start(int uffd, int n, void *dst, const void *src, uint64_t len,
                                          uint64_t page_size, bool wp);

struct rel_resolver_counts {
    uint64_t faults, wp_faults, existed, errors;
    int first_error; ///< -errno of the first failed resolution
    int threads;
};

/// Stops the resolvers (a SIGUSR2 with a no-op handler interrupts their read(2); a resolution
/// in progress finishes) and joins them within 10 s. Returns 0 (counts in *out) or -ETIMEDOUT.
int rel_resolvers_stop(struct rel_resolvers *r, struct rel_resolver_counts *out);

// MARK: - Unprivileged open

/// Forks a child that drops to `uid`/`gid` (setgroups(0), setresgid, setresuid) and calls
/// cuffd_open(`flags`). Returns the child's result: the fd number (>= 0, closed at once) or
/// -errno; -EPERM+(-1000) style failures of the privilege drop itself are reported as
/// -(1000 + errno). Waits at most `timeout_ms` (then -ETIMEDOUT).
int rel_open_as(uid_t uid, gid_t gid, int flags, int timeout_ms);

/// Forks a child that drops to `uid`/`gid` (as rel_open_as) and connects a Unix stream socket
/// to `path`; the connected socket comes back to this process (SCM_RIGHTS), so its peer
/// credentials (SO_PEERCRED, taken at connect) are `uid`/`gid` while this process uses it.
/// Returns the socket (close-on-exec) or -errno (the connect's, or -(1000 + errno) for the
/// privilege drop); -ETIMEDOUT after `timeout_ms`.
int rel_connect_as(uid_t uid, gid_t gid, const char *path, int timeout_ms);

/// 1 when the file system holding `path` is mounted noexec, 0 when not, -errno on error.
int rel_mounted_noexec(const char *path);

/// fallocate(PUNCH_HOLE|KEEP_SIZE) over `[0, len)` of `fd`: drops shmem/hugetlb file pages.
/// Returns 0 or -errno.
int rel_punch_hole(int fd, uint64_t len);

/// Forks a child that only sleeps (holding a copy-on-write copy of this process's memory)
/// until rel_kill_reap. Returns its pid or -errno.
pid_t rel_fork_sleeper(void);
/// SIGKILLs and reaps `pid`. Returns 0 or -errno.
int rel_kill_reap(pid_t pid);

/// Reads an integer from a /proc/sys file (e.g. /proc/sys/vm/unprivileged_userfaultfd);
/// -errno on failure.
long rel_sysctl_read(const char *path);
/// Writes an integer to a /proc/sys file. Returns 0 or -errno.
int rel_sysctl_write(const char *path, long value);

#ifdef __cplusplus
}
#endif

#endif // RELIABILITY_H
