// Shared helpers of the benchmark kernels (not public).
#ifndef CUBENCH_INTERNAL_H
#define CUBENCH_INTERNAL_H

#include "CUffd.h"
#include "CUffdBench.h"

#include <pthread.h>
#include <stdint.h>

#define CUBENCH_PAGE 4096ull
#define CUBENCH_2M (2ull << 20)
#define CUBENCH_DEFAULT_TIMEOUT_MS 20000u

/// The CPU for thread `i` of a kind: -1 stays unpinned.
int cubench_cpu_for(int base, uint32_t i, bool spread);

/// Pins the caller when cpu >= 0; ignores failure (the run reports its placement anyway).
void cubench_pin(int cpu);

/// Pins the caller to `cpu` (when >= 0) and saves its previous affinity in `saved`;
/// cubench_unpin restores it, so a kernel run on the caller's thread leaves no trace.
#include <sched.h>
void cubench_pin_caller(int cpu, cpu_set_t *saved);
void cubench_unpin_caller(int cpu, const cpu_set_t *saved);

/// Joins `t` until the absolute CLOCK_REALTIME deadline; 0 or -ETIMEDOUT.
int cubench_join_until(pthread_t t, const struct timespec *deadline);

// Deadlines: cuffd_deadline_after_ms (one helper for the core's tests and the benchmarks).

/// Opens a non-blocking uffd and enables `wanted` features (all must be offered).
/// Returns the fd or -errno (-EOPNOTSUPP when a wanted feature is missing).
int cubench_uffd_open(uint64_t wanted, uint64_t *granted);

/// Signals an eventfd.
void cubench_signal(int efd);

/// The minimal handler's wait, and nothing more: poll the uffd and the stop fd (1 s ticks),
/// read one message. Returns 1 with a page fault in *m, 0 once the stop fd is readable, -1 when
/// poll fails. Other events, and reads another handler won (EAGAIN), are skipped.
int cubench_next_fault(int uffd, int stopfd, struct uffd_msg *m);

/// Runs `pl->fault_threads` threads that each touch one byte of every 4 KiB page of their
/// slice of [base, base+len) (slices are whole `granule`s), released together once all exist. `*ns`
/// receives last end - first start. When a thread is still running at the deadline, `unblock`
/// (may be NULL) is called so blocked threads can finish, every thread is joined, and the
/// result is -ETIMEDOUT.
int cubench_run_touchers(char *base, uint64_t len, uint64_t granule, const struct cubench_placement *pl,
                         bool write, uint32_t timeout_ms, void (*unblock)(void *), void *unblock_ctx,
                         uint64_t *ns);

#endif
