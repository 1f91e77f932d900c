// In-thread fault resolution (UFFD_FEATURE_SIGBUS): the faulting thread resolves its own fault
// in a SIGBUS handler, with no handler thread, no context switch and no wake-up.
//
// With UFFD_FEATURE_SIGBUS enabled on a uffd, a user-mode fault in a range registered on it
// raises SIGBUS (si_code BUS_ADRERR, si_addr the faulting address) instead of queueing a
// message. The handler here recognises such a signal by its code and address (a table of
// ranges, read without locks), asks the range's policy for a resolution, performs it with the
// usual outcome model and returns: the faulting instruction runs again and finds the page.
// Every other SIGBUS (another code, an address outside every range, a signal sent with kill)
// goes to the action that was installed before, or the default action, as if we were not there.
//
// Kernel-mode accesses (a syscall reading or writing an unresolved page of a SIGBUS-mode range)
// do not raise a signal: the syscall fails with EFAULT (or returns short). Resolve such pages
// first (cuffd_sigbus_prefault) or keep memory handed to syscalls in a second, fd-mode range.
#ifndef CUFFD_SIGBUS_H
#define CUFFD_SIGBUS_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct cuffd_resolution;

/// How a range's faults are resolved (the C-level policy).
enum cuffd_sigbus_policy {
    CUFFD_SIGBUS_COPY = 1,     ///< UFFDIO_COPY from `src` + (page - start): memory laid out like the range
    CUFFD_SIGBUS_FILE = 2,     ///< pread `file_fd` at `file_offset` + (page - start) into a scratch page, then UFFDIO_COPY; bytes past EOF are zeros
    CUFFD_SIGBUS_ZEROPAGE = 3, ///< UFFDIO_ZEROPAGE (hugetlb: COPY of a zeroed scratch page)
    CUFFD_SIGBUS_MOVE = 4,     ///< UFFDIO_MOVE of page i of the donor `src` to page i; a donor hole (moved before) maps zeros
    CUFFD_SIGBUS_CONTINUE = 5, ///< UFFDIO_CONTINUE (MINOR ranges: the page cache is filled elsewhere)
    CUFFD_SIGBUS_POISON = 6,   ///< UFFDIO_POISON: this access and every later one raise a SIGBUS delivered as if we were not there
    CUFFD_SIGBUS_CUSTOM = 7,   ///< `decide(ctx, addr, res)`: must be async-signal-safe C
};

/// What happens when a resolution fails (an ioctl error other than EEXIST/EAGAIN/ENOENT/ESRCH,
/// a source error, a policy that gives up). Never a loop of SIGBUS: when the fallback fails
/// too, the signal is delivered as if we were not there.
enum cuffd_sigbus_fallback {
    /// Deliver the SIGBUS to the previously installed action (or the default: the process dies
    /// with SIGBUS), as if we were not there.
    CUFFD_SIGBUS_FALLBACK_SIGNAL = 0,
    /// Map zeros on the page (hugetlb: COPY of a zeroed scratch page) and let the thread go on.
    CUFFD_SIGBUS_FALLBACK_ZEROPAGE = 1,
    /// UFFDIO_POISON the page: this access and every later one raise a SIGBUS delivered as if we
    /// were not there (the range remembers up to CUFFD_SIGBUS_MAX_POISONED poisoned pages: the
    /// kernel reports a poison marker with the same BUS_ADRERR as a missing page, and a COPY
    /// would fill over it; beyond that many the signal is delivered without poisoning).
    CUFFD_SIGBUS_FALLBACK_POISON = 2,
};

/// Decides one fault for CUFFD_SIGBUS_CUSTOM: fill `res` (op, dst, len, src, mode) for the
/// fault at `addr`, return 0; or return -errno to take the fallback. Runs in a signal handler
/// on the faulting thread: async-signal-safe C only (no malloc, no locks, no Swift).
typedef int (*cuffd_sigbus_decide_fn)(void *ctx, uint64_t addr, struct cuffd_resolution *res);

/// Options of a range (`cuffd_sigbus_range.flags`).
enum cuffd_sigbus_flags {
    /// Record this range's fault-service latency (`cuffd_sigbus_stats.latency`): two clock
    /// reads and a few relaxed atomics per fault, 1-2% of an in-thread fault here (BENCHMARKS.md),
    /// so it is asked for. Without it the handler reads no clock for the range's faults (none at
    /// all while no range in the table is timed) and `latency` stays empty.
    CUFFD_SIGBUS_LATENCY = 1 << 0,
};

/// One range and its policy.
struct cuffd_sigbus_range {
    uint64_t start;        ///< page-aligned start of a range registered on `uffd`
    uint64_t len;          ///< bytes, a multiple of page_size
    uint64_t page_size;    ///< the unit of one resolution: base page, or the huge page of a hugetlb range (0: base page)
    int32_t uffd;          ///< a userfaultfd with UFFD_FEATURE_SIGBUS and no EVENT_* feature (nobody reads events), kept open while the range is in the table
    uint32_t policy;       ///< enum cuffd_sigbus_policy
    int32_t fallback;      ///< enum cuffd_sigbus_fallback
    int32_t file_fd;       ///< CUFFD_SIGBUS_FILE: the file (kept open by the caller)
    uint64_t src;          ///< COPY: source of `start`; MOVE: donor of `start` (MADV_DONTFORK, populated)
    uint64_t file_offset;  ///< FILE: file offset of `start`
    uint64_t mode;         ///< extra mode bits for the ioctl (UFFDIO_COPY_MODE_WP, ...); DONTWAKE is dropped
    uint32_t scratch_pages;///< FILE / hugetlb ZEROPAGE: scratch pages for concurrent faults (0: 8, at most 64)
    uint32_t flags;        ///< enum cuffd_sigbus_flags (0: the defaults)
    cuffd_sigbus_decide_fn decide; ///< CUSTOM only
    void *ctx;                     ///< CUSTOM only
};

/// Fault-service latency histogram buckets: values 0..7 ns each have a bucket; above, every
/// power of two [2^e, 2^(e+1)) is split into 8 equal sub-buckets (a bucket's width is at most
/// 1/8 of its lower bound: 12.5% precision), up to 2^36 ns (~69 s); longer samples go into the
/// last bucket. 8 + 33 * 8 buckets.
#define CUFFD_SIGBUS_LAT_SUB_BITS 3
#define CUFFD_SIGBUS_LAT_MAX_EXP 36
#define CUFFD_SIGBUS_LAT_BUCKETS ((1 << CUFFD_SIGBUS_LAT_SUB_BITS) * (CUFFD_SIGBUS_LAT_MAX_EXP - CUFFD_SIGBUS_LAT_SUB_BITS + 1))

/// Fault-service latency of one range: one sample per SIGBUS the range's resolver handled
/// (every outcome: resolved, already there, gone, fallback, delivered; not the loop breaks),
/// CLOCK_MONOTONIC nanoseconds from entering the handler to the resolution returning (EAGAIN
/// retries included; the chaining of a delivered signal not); empty for a range added without
/// CUFFD_SIGBUS_LATENCY. Recorded in the handler with
/// relaxed atomics into fixed buckets: no allocation, no lock.
struct cuffd_sigbus_latency {
    uint64_t count;      ///< samples
    uint64_t sum_ns;     ///< their sum (mean = sum_ns / count)
    uint64_t min_ns;     ///< the smallest sample, exact (0 when count == 0)
    uint64_t max_ns;     ///< the largest sample, exact
    uint64_t buckets[CUFFD_SIGBUS_LAT_BUCKETS]; ///< samples per bucket (cuffd_sigbus_latency_bucket_of)
};

/// The bucket a latency of `ns` nanoseconds is counted in (0 ..< CUFFD_SIGBUS_LAT_BUCKETS).
unsigned cuffd_sigbus_latency_bucket_of(uint64_t ns);

/// The largest latency counted in bucket `i` (inclusive upper bound; the last bucket: UINT64_MAX).
uint64_t cuffd_sigbus_latency_bucket_upper(unsigned i);

/// The `p`-th percentile (0 < p <= 100) of `l`: the upper bound of the bucket holding the
/// sample of rank ceil(p% of count), clamped to [min_ns, max_ns] — at or above the exact
/// percentile by less than 12.5%, never above max_ns (p100 is max_ns) — or 0 with no samples.
uint64_t cuffd_sigbus_latency_percentile(const struct cuffd_sigbus_latency *l, double p);

/// Counters of one range (cumulative while it is in the table).
struct cuffd_sigbus_stats {
    uint64_t signals;    ///< SIGBUS taken in the range (every attempt, retries included)
    uint64_t resolved;   ///< the policy's op completed
    uint64_t existed;    ///< EEXIST: another thread resolved the page first
    uint64_t gone;       ///< ENOENT/ESRCH: the range is no longer registered or the mm is gone; the access is retried
    uint64_t retries;    ///< EAGAIN with no progress, retried in the handler
    uint64_t fallbacks;  ///< failures the fallback resolved
    uint64_t delivered;  ///< failures delivered as SIGBUS to the previous action (fallback SIGNAL, or the fallback failed)
    uint64_t loop_breaks;///< the same page faulted again and again on one thread: delivered instead of looping
    uint64_t bytes;      ///< bytes the policy's ops and the fallbacks mapped
    uint64_t ops[8];     ///< by enum cuffd_op (COPY, ZEROPAGE, MOVE, CONTINUE, UNPROTECT, WAKE, POISON) incl. fallbacks
    int32_t first_error; ///< errno of the first failure (0: none)
    uint32_t reserved;
    uint64_t poisoned_hits; ///< accesses to pages this range poisoned, delivered (also counted in signals)
    struct cuffd_sigbus_latency latency; ///< fault-service latency (after the counters: their offsets are unchanged)
};

/// Process-wide counters of the handler.
struct cuffd_sigbus_global_stats {
    uint64_t signals;    ///< every SIGBUS the handler saw
    uint64_t chained;    ///< SIGBUS that were not ours, passed on as if we were not there
    uint64_t retired;    ///< SIGBUS in a range removed since the fault: the access is retried
};

#define CUFFD_SIGBUS_MAX_RANGES 64
#define CUFFD_SIGBUS_MAX_POISONED 128

/// Adds a range to the table; its SIGBUS are resolved from now on (once installed). Returns the
/// range's id (>= 0; ids of removed ranges are reused), or -EINVAL (bad alignment, unknown policy or flag, missing source), -EEXIST (it
/// overlaps a range in the table), -ENOSPC (table full), -ENOMEM (scratch pages). Not
/// async-signal-safe; may run while other threads fault.
int cuffd_sigbus_add(const struct cuffd_sigbus_range *range);

/// Removes a range: new signals in it are no longer resolved (a signal already raised retries
/// the access once; the range is normally unregistered first, so the access then succeeds).
/// Returns once no handler uses the range any more (its fd, source and scratch pages may be
/// released then): 0, or -ENOENT (no such id).
int cuffd_sigbus_remove(int id);

/// The range's counters. 0, or -ENOENT.
int cuffd_sigbus_range_stats(int id, struct cuffd_sigbus_stats *out);

/// The process-wide counters.
void cuffd_sigbus_global(struct cuffd_sigbus_global_stats *out);

/// Installs the SIGBUS handler (sigaction, SA_SIGINFO | SA_ONSTACK | SA_NODEFER | SA_RESTART),
/// remembering the action it replaces. Idempotent: 0 when already installed and active.
/// Returns 0 or -errno.
int cuffd_sigbus_install(void);

/// Stops resolving: every SIGBUS is passed on to the previous action as if we were not there.
/// With `restore`, the previous action is also put back with sigaction — only when ours is still
/// the installed one (-EBUSY otherwise: someone installed over us and may chain to us) and safe
/// only when no thread can have a signal from a range pending (the faulting threads are done):
/// a SIGBUS raised just before the restore would reach the old action. Without `restore` our
/// handler stays installed as a pass-through. -EBUSY while ranges are in the table.
int cuffd_sigbus_uninstall(bool restore);

/// Whether the handler is installed and resolving.
bool cuffd_sigbus_installed(void);

/// Resolves `[addr, addr+len)` of the range `id` now, from ordinary (non-signal) context,
/// page by page through the range's policy (pages already there count as done): for memory a
/// syscall will read or write. Returns 0, or the -errno of the first page that failed.
int cuffd_sigbus_prefault(int id, uint64_t addr, uint64_t len);

#ifdef __cplusplus
}
#endif

#endif // CUFFD_SIGBUS_H
