// CUffd: the kernel-facing core of UffdKit.
//
// One C function per userfaultfd verb, plus the fault loop. Every function returns 0 (or a
// non-negative value) on success and -errno on failure; nothing here sets or relies on the
// caller's errno. Addresses and lengths are uint64_t, as in the kernel's structs.
#ifndef CUFFD_H
#define CUFFD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "cuffd_compat.h"
#include "cuffd_install.h"

#ifdef __cplusplus
extern "C" {
#endif

// MARK: - Open ------------------------------------------------------------------------------

/// How cuffd_open obtained the fd.
enum cuffd_open_path {
    CUFFD_OPEN_SYSCALL = 1,  ///< userfaultfd(2)
    CUFFD_OPEN_DEVICE = 2,   ///< /dev/userfaultfd + USERFAULTFD_IOC_NEW
};

/// Options for cuffd_open.
enum cuffd_open_flags {
    CUFFD_OPEN_NONBLOCK = 1 << 0,          ///< O_NONBLOCK on the fd (the fault loop needs it)
    CUFFD_OPEN_USER_MODE_ONLY = 1 << 1,    ///< UFFD_USER_MODE_ONLY: kernel-mode faults get EFAULT
    CUFFD_OPEN_ALLOW_KERNEL_FAULTS = 1 << 2, ///< on EINVAL (kernel < 5.11) retry without USER_MODE_ONLY
    CUFFD_OPEN_NO_DEVICE = 1 << 3,         ///< never fall back to /dev/userfaultfd
    CUFFD_OPEN_DEVICE_ONLY = 1 << 4,       ///< use /dev/userfaultfd only (tests, sandboxes)
};

/// Opens a userfaultfd with O_CLOEXEC. Tries userfaultfd(2); where the syscall is refused
/// (EPERM, EACCES, ENOSYS) and /dev/userfaultfd is usable, opens through the device instead.
/// Returns the fd, or -errno of the *first* refusal when every path failed.
/// `path` (may be NULL) receives a cuffd_open_path; `user_mode_only` (may be NULL) receives
/// whether the fd handles user-mode faults only.
int cuffd_open(int flags, int *path, bool *user_mode_only);

// MARK: - Features --------------------------------------------------------------------------

/// Every feature bit this build knows a name for (the kernel may report more).
#define CUFFD_KNOWN_FEATURES ((uint64_t)0x1FFFF)

/// Probes the kernel: opens a throwaway fd, calls UFFDIO_API with no features, and returns
/// every feature the kernel offers and the fd-level ioctl mask. Unknown bits from a newer
/// kernel are kept as they are.
int cuffd_probe(uint64_t *features, uint64_t *ioctls);

/// UFFDIO_API on `fd` with `requested` features. On success `granted` receives the features
/// now enabled on the fd (the requested set: the kernel refuses the call otherwise; plus
/// WP_UNPOPULATED, which the kernel enables along with WP_ASYNC) and
/// `ioctls` the fd-level ioctl mask. A second call on the same fd fails (EINVAL).
int cuffd_api(int fd, uint64_t requested, uint64_t *granted, uint64_t *ioctls);

/// UFFDIO_API with an explicit API number (for tests of the kernel's checks).
int cuffd_api_raw(int fd, uint64_t api, uint64_t requested, uint64_t *granted, uint64_t *ioctls);

/// A name for a feature bit index (0..63): "EVENT_FORK", "MOVE", ... or NULL when unknown.
const char *cuffd_feature_name(unsigned bit);

/// A name for an ioctl number index (_UFFDIO_*): "COPY", "MOVE", ... or NULL when unknown.
const char *cuffd_ioctl_name(unsigned nr);

// MARK: - Register --------------------------------------------------------------------------

/// UFFDIO_REGISTER `[start, start+len)` with a combination of UFFDIO_REGISTER_MODE_* bits.
/// `range_ioctls` (may be NULL) receives the ioctls available on the range.
int cuffd_register(int fd, uint64_t start, uint64_t len, uint64_t modes, uint64_t *range_ioctls);

/// UFFDIO_UNREGISTER `[start, start+len)`.
int cuffd_unregister(int fd, uint64_t start, uint64_t len);

// MARK: - Resolve ---------------------------------------------------------------------------
//
// Each resolve function returns 0 when the whole range is done, or -errno. `*done` always
// receives the bytes resolved by this call, also on failure. Partial progress (the kernel's
// signed result field > 0 with EAGAIN) is continued from where the kernel stopped, so a
// return of -EAGAIN means "no progress possible now": the mm is changing or a REMOVE/UNMAP
// event is unread; drain events and retry from dst + *done. Other errors keep their meaning:
// EEXIST (already resolved, wake it), ENOENT (no VMA / source hole), ESRCH (the process is
// gone), EBUSY (MOVE source not exclusive), EINVAL (misaligned / unregistered), ENOMEM, EFAULT.

/// UFFDIO_COPY. `mode`: UFFDIO_COPY_MODE_DONTWAKE | UFFDIO_COPY_MODE_WP.
int cuffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done);

/// UFFDIO_ZEROPAGE. `mode`: UFFDIO_ZEROPAGE_MODE_DONTWAKE.
int cuffd_zeropage(int fd, uint64_t dst, uint64_t len, uint64_t mode, int64_t *done);

/// UFFDIO_MOVE. `mode`: UFFDIO_MOVE_MODE_DONTWAKE | UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES.
int cuffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done);

/// UFFDIO_CONTINUE. `mode`: UFFDIO_CONTINUE_MODE_DONTWAKE | UFFDIO_CONTINUE_MODE_WP.
int cuffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);

/// UFFDIO_POISON. `mode`: UFFDIO_POISON_MODE_DONTWAKE.
int cuffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);

/// UFFDIO_WRITEPROTECT. `protect` sets or clears protection; `dontwake` only matters when
/// clearing. Retried internally while the kernel reports EAGAIN for a changing mm, up to a
/// bound; then -EAGAIN.
int cuffd_writeprotect(int fd, uint64_t start, uint64_t len, bool protect, bool dontwake);

/// UFFDIO_WAKE `[start, start+len)`.
int cuffd_wake(int fd, uint64_t start, uint64_t len);

// MARK: - Messages --------------------------------------------------------------------------

/// Reads up to `max` messages without blocking. Returns the count (0 when none is queued),
/// or -errno.
ssize_t cuffd_read_msgs(int fd, struct uffd_msg *msgs, size_t max);

/// Waits until the fd is readable or `timeout_ms` passes (-1: forever). 1 readable, 0 timeout.
int cuffd_wait_readable(int fd, int timeout_ms);

/// Makes the pipe a handler's readers hand work to a service thread through: close-on-exec,
/// the write end non-blocking (a reader never waits), room for at least `bytes` if the system
/// allows (else the default). Returns its capacity in bytes, with `fds` set, or -errno.
int cuffd_service_pipe(int fds[2], size_t bytes);

// MARK: - Fault loop ------------------------------------------------------------------------

/// What the fault loop does for one message.
enum cuffd_op {
    CUFFD_OP_NONE = 0,       ///< nothing (events, or the decider resolved it itself)
    CUFFD_OP_COPY,           ///< UFFDIO_COPY dst..dst+len from src
    CUFFD_OP_ZEROPAGE,       ///< UFFDIO_ZEROPAGE
    CUFFD_OP_MOVE,           ///< UFFDIO_MOVE dst..dst+len from src
    CUFFD_OP_CONTINUE,       ///< UFFDIO_CONTINUE
    CUFFD_OP_UNPROTECT,      ///< UFFDIO_WRITEPROTECT clear (and wake)
    CUFFD_OP_WAKE,           ///< UFFDIO_WAKE only
    CUFFD_OP_POISON,         ///< UFFDIO_POISON: the faulting thread gets SIGBUS
    CUFFD_OP_FAIL,           ///< the decider could not resolve: apply the loop's fallback
    /// Not yet: the bytes are being fetched. The decider claimed the range with
    /// cuffd_deferred_begin (new fetch or joined one in flight); the loop performs nothing and
    /// the thread stays blocked until cuffd_deferred_complete/_fail, the deadline, or cancel.
    CUFFD_OP_DEFER,
    CUFFD_OP_COUNT
};

/// What the fault loop does when a resolution fails (policy error, source error, or an
/// ioctl error other than EEXIST/EAGAIN/ENOENT/ESRCH), so that no faulting thread is left
/// blocked. The failure is counted and reported to the completion callback either way.
enum cuffd_fallback {
    /// Poison the page (UFFDIO_POISON): the faulting thread gets SIGBUS on retry. Needs
    /// UFFD_FEATURE_POISON; without it, falls back to CUFFD_FALLBACK_ZEROPAGE.
    CUFFD_FALLBACK_POISON = 0,
    /// Map a zero page (anon/shmem MISSING; hugetlb: COPY of zeros) / unprotect (WP) / continue (MINOR).
    CUFFD_FALLBACK_ZEROPAGE = 1,
    /// Only wake: the thread re-faults and the fault is delivered again.
    CUFFD_FALLBACK_WAKE = 2,
};

/// One resolution, filled by the decide callback for the message at the same index.
/// The loop writes `done` and `error` after performing it.
struct cuffd_resolution {
    uint32_t op;       ///< enum cuffd_op
    uint32_t reserved;
    uint64_t mode;     ///< extra mode bits for the ioctl (e.g. UFFDIO_COPY_MODE_WP); DONTWAKE is managed by the loop
    uint64_t dst;      ///< page-aligned start of the range to resolve
    uint64_t len;      ///< bytes (a multiple of the page size of the range)
    uint64_t src;      ///< COPY: source bytes; MOVE: source pages
    int64_t done;      ///< out: bytes resolved
    int32_t error;     ///< out: 0, or the errno that was handled (EEXIST counts as done)
    uint32_t outcome;  ///< out: enum cuffd_outcome
    uint64_t start_ns; ///< out: CLOCK_MONOTONIC when the message was read
    uint64_t end_ns;   ///< out: CLOCK_MONOTONIC when the resolution finished
};

/// How a resolution ended.
enum cuffd_outcome {
    CUFFD_OUTCOME_NONE = 0,       ///< not a resolution (event or OP_NONE)
    CUFFD_OUTCOME_RESOLVED,       ///< the op completed
    CUFFD_OUTCOME_EXISTED,        ///< EEXIST: already resolved by someone else; woken
    CUFFD_OUTCOME_GONE,           ///< ENOENT/ESRCH: range or process gone; woken
    CUFFD_OUTCOME_FALLBACK,       ///< failed; the fallback resolved it (error says why)
    CUFFD_OUTCOME_FAILED,         ///< failed and the fallback failed too (error says why)
    CUFFD_OUTCOME_DEFERRED,       ///< OP_DEFER: left waiting for its fetch (see cuffd_deferred_*)
    /// EAGAIN: drain events, then go on from dst + done. error is EAGAIN when the op met it,
    /// or the op's own errno when the op failed and its fallback met EAGAIN. In a batch (seen
    /// by `complete`): the fault is kept and decided again in the next round.
    CUFFD_OUTCOME_RETRY = 100,
};

/// Decides resolutions for a batch: msgs[i] -> res[i]. Called once per read(), on the loop's
/// thread. `res` is zeroed before the call. Events are in the batch too (op stays NONE).
typedef void (*cuffd_decide_fn)(void *ctx, const struct uffd_msg *msgs,
                                struct cuffd_resolution *res, size_t n);

/// Sees a batch after it was performed (may be NULL): stats, latency, error reporting.
typedef void (*cuffd_complete_fn)(void *ctx, const struct uffd_msg *msgs,
                                  const struct cuffd_resolution *res, size_t n);

/// Where each event kind is counted in cuffd_loop_stats.events.
enum cuffd_event_slot {
    CUFFD_EVENT_SLOT_FORK = 0,
    CUFFD_EVENT_SLOT_REMAP,
    CUFFD_EVENT_SLOT_REMOVE,
    CUFFD_EVENT_SLOT_UNMAP,
    CUFFD_EVENT_SLOT_OTHER,
    CUFFD_EVENT_SLOTS
};

/// Counters of one loop; each thread running a loop passes its own (no sharing, no locks).
struct cuffd_loop_stats {
    uint64_t reads;            ///< read() calls that returned messages
    uint64_t messages;
    uint64_t faults_missing;
    uint64_t faults_wp;
    uint64_t faults_minor;
    uint64_t events[CUFFD_EVENT_SLOTS]; ///< by enum cuffd_event_slot
    uint64_t ops[CUFFD_OP_COUNT];
    uint64_t bytes;            ///< bytes resolved
    uint64_t existed;          ///< EEXIST outcomes
    uint64_t gone;             ///< ENOENT/ESRCH outcomes
    uint64_t retries;          ///< EAGAIN with no progress, retried after draining events
    uint64_t fallbacks;
    uint64_t failures;
    uint64_t stop_drained;     ///< faults resolved while stopping
};

struct cuffd_deferred; // below: the in-flight table of deferred resolutions

/// The loop's configuration.
struct cuffd_loop_config {
    int uffd;                  ///< a non-blocking userfaultfd
    int stop_fd;               ///< readable = stop (an eventfd); -1 for none
    uint32_t batch;            ///< messages per read(), 1..CUFFD_MAX_BATCH
    int32_t fallback;          ///< enum cuffd_fallback
    uint64_t features;         ///< granted features (to know whether POISON is there)
    uint32_t spin_polls;       ///< >0: non-blocking read this many times before poll() (busy-poll)
    uint32_t reserved;
    cuffd_decide_fn decide;
    cuffd_complete_fn complete; ///< may be NULL
    void *ctx;
    /// The in-flight table OP_DEFER answers use (NULL: none). The loop wakes for its deadlines
    /// and applies the fallback to fetches that missed them, passing them to `complete` in
    /// batches of their own (each fetch's first fault; op DEFER, error ETIMEDOUT).
    struct cuffd_deferred *deferred;
};

#define CUFFD_MAX_BATCH 64

/// Runs the fault loop until stop_fd becomes readable or the uffd reports POLLHUP/POLLERR.
/// Several threads may run it on the same uffd, each with its own stats.
///
/// On stop, everything already queued is still read and resolved through `decide` (with the
/// fallback on failure) before the function returns, so no thread that faulted before the
/// stop is left blocked. Faults that arrive later stay queued on the fd until a loop runs
/// again or the fd is closed (closing wakes them and they fault normally). Faults answered
/// with OP_DEFER are not waited for: the owner cancels (cuffd_deferred_cancel) or finishes them.
/// A fault kept after EAGAIN is decided again; if the decider answers the same resolution, it
/// goes on from where the kernel stopped (the done bytes are counted once).
/// Returns 0; -EINVAL when the uffd never had its UFFDIO_API handshake; -EBADF when it is not
/// an open fd; -errno when poll/read failed for another reason.
int cuffd_loop_run(const struct cuffd_loop_config *config, struct cuffd_loop_stats *stats);

/// Performs one resolution with the loop's semantics (EEXIST -> wake, partial -> continue,
/// failure -> fallback). `msg` is the fault it answers (for the fallback), may be NULL.
/// Returns the outcome, CUFFD_OUTCOME_RETRY for EAGAIN met by the op or by its fallback
/// (nothing was woken: drain events, then go on from dst + done); fills res->done / res->error.
int cuffd_resolve_one(int uffd, const struct uffd_msg *msg, struct cuffd_resolution *res,
                      int fallback, uint64_t features);

// MARK: - Deferred resolution ---------------------------------------------------------------
//
// A decider may answer a fault "not yet" (CUFFD_OP_DEFER) while the bytes of its range are
// fetched elsewhere (network, disk, decompression). The table below keeps one entry per range
// in flight (single flight: a fault inside a range in flight joins it and waits with it) and is
// finished from any thread:
//
//   decider (loop thread)        cuffd_deferred_begin(...) == 1 -> start a fetch with `token`
//                                                          == 0 -> joined: nothing to start
//                                res.op = CUFFD_OP_DEFER
//   fetcher (any thread, once)   cuffd_deferred_complete(token, bytes) or _fail(token, errno)
//   loop (deadline)              cuffd_deferred_expire: fallback, error ETIMEDOUT
//   owner (stop)                 cuffd_deferred_cancel: wake every range in flight
//
// Finishing performs UFFDIO_COPY of the whole range with the loop's outcome model: EEXIST ->
// that page is kept, the rest copied, the outcome counted as EXISTED; EAGAIN (no progress) -> waits for a reader to drain the event
// and goes on from start+done, up to the deadline; any failure (and _fail) -> the fallback on
// the range. Every thread waiting in the range is woken by that one COPY (or fallback): joiners
// cost nothing. A token finishes at most once; a late or second finish returns -ETIMEDOUT
// (expired), -ECANCELED (cancelled) or -ESTALE and changes nothing. The table takes its own
// mutex around begin and the bookkeeping of finish, never around a resolving ioctl; the loop's
// synchronous path never touches it.

/// The in-flight table (opaque).
struct cuffd_deferred;

/// Counters of a table (faults and ranges), a snapshot.
struct cuffd_deferred_stats {
    uint64_t fetches;     ///< ranges begun (1 from cuffd_deferred_begin)
    uint64_t joined;      ///< faults that joined a range in flight
    uint64_t resolved;    ///< ranges filled by complete
    uint64_t bytes;       ///< bytes filled by complete
    uint64_t existed;     ///< completes that met EEXIST (someone filled part of it): woken
    uint64_t gone;        ///< completes that met ENOENT/ESRCH: woken
    uint64_t retries;     ///< finishes that met EAGAIN (no progress) and waited for the event to be read
    uint64_t fallbacks;   ///< failed/expired ranges resolved by the fallback
    uint64_t failures;    ///< ... where the fallback failed too (woken to re-fault)
    uint64_t expired;     ///< ranges that missed their deadline
    uint64_t cancelled;   ///< ranges woken by cuffd_deferred_cancel
    uint64_t late;        ///< finishes refused (expired, cancelled, twice)
    uint64_t full;        ///< begins refused with -ENOSPC
    uint64_t in_flight;   ///< ranges in flight now
};

/// Makes a table for up to `capacity` ranges in flight on `uffd` (the table keeps its own dup
/// of it, closed by cuffd_deferred_cancel or _destroy). `fallback`/`features` as in the loop.
/// Returns 0 and the table in *out, or -errno.
int cuffd_deferred_create(int uffd, uint32_t capacity, int fallback, uint64_t features,
                          struct cuffd_deferred **out);

/// Cancels what is in flight (as cuffd_deferred_cancel) and frees the table.
void cuffd_deferred_destroy(struct cuffd_deferred *d);

/// Claims `[dst, dst+len)` (aligned to `page_size`, the memory's page size, 0: the base page;
/// containing the fault of `msg`) for a fetch due by `deadline_ns` (CLOCK_MONOTONIC). Returns 1: new, the caller must finish `*token` exactly
/// once; 0: the fault's page is inside a range in flight, joined it (`*token` is that range's);
/// -ENOSPC: `capacity` ranges in flight; -ESHUTDOWN: cancelled; -EINVAL: bad range.
int cuffd_deferred_begin(struct cuffd_deferred *d, const struct uffd_msg *msg, uint64_t dst,
                         uint64_t len, uint64_t page_size, uint64_t deadline_ns, uint64_t *token);

/// The bytes of `token`'s range are at `src` (len bytes): UFFDIO_COPY them and wake every
/// waiter. Returns the outcome (enum cuffd_outcome) or -ETIMEDOUT/-ECANCELED/-ESTALE (nothing
/// done); `res` (may be NULL) receives the resolution as performed, with the fetch's first fault
/// in `msg` (may be NULL) for reporting.
int cuffd_deferred_complete(struct cuffd_deferred *d, uint64_t token, uint64_t src,
                            struct uffd_msg *msg, struct cuffd_resolution *res);

/// The fetch of `token` failed with `error` (an errno): the fallback unblocks its range.
/// Returns and fills as cuffd_deferred_complete (res->error = error).
int cuffd_deferred_fail(struct cuffd_deferred *d, uint64_t token, int error,
                        struct uffd_msg *msg, struct cuffd_resolution *res);

/// Applies the fallback to ranges whose deadline is <= now_ns, at most `n` of them, filling
/// msgs/res (error ETIMEDOUT). Returns how many expired.
size_t cuffd_deferred_expire(struct cuffd_deferred *d, uint64_t now_ns, struct uffd_msg *msgs,
                             struct cuffd_resolution *res, size_t n);

/// The earliest deadline in flight (CLOCK_MONOTONIC ns), UINT64_MAX when none.
uint64_t cuffd_deferred_next_deadline(struct cuffd_deferred *d);

/// For stop: refuses new begins, waits for finishes in progress, wakes every range still in
/// flight (its threads re-fault: their faults queue for the next loop, or fault normally once
/// the uffd is closed), refuses their late finishes (-ECANCELED) and closes the table's fd.
/// Returns the number of ranges cancelled. Idempotent.
size_t cuffd_deferred_cancel(struct cuffd_deferred *d);

/// A snapshot of the counters.
void cuffd_deferred_get_stats(struct cuffd_deferred *d, struct cuffd_deferred_stats *out);

// MARK: Prefetch through the table
//
// A prefetcher claims a range in the same table without a fault, so that a fault arriving on
// it joins the prefetch's fetch instead of starting its own (single flight for both):
//
//   prefetcher      cuffd_deferred_claim(range, slot) == 1 -> start a fetch with `token`
//   fetcher (once)  cuffd_deferred_complete(token, bytes)  -> COPY (waking joined faults), EEXIST
//                                                             pages kept and counted
//                   cuffd_deferred_fail(token, errno)      -> dropped, same as _abandon
//   prefetcher      cuffd_deferred_abandon(token, errno)   -> dropped: the range is woken, NO fallback
//   prefetcher      cuffd_deferred_claims_wait(N)          -> bounds the claims in flight
//
// A prefetch failure is not a fault failure: a dropped claim wakes its range and the threads
// that joined it re-fault, to get their own fetch (or the fallback) as any fault would. The
// loop never expires a claim (its owner abandons it); cuffd_deferred_cancel wakes claims like
// fetches. The result of a claim is written to its slot, under the table's mutex, before the
// claim is freed; after a cancel a claim's slot is never written.

/// How a prefetch claim ended (written once by the table; done = 1 when it is final).
struct cuffd_prefetch_result {
    int32_t done;          ///< 1 when finished by complete/fail/abandon (0: in flight, or cancelled)
    int32_t outcome;       ///< RESOLVED, EXISTED, GONE, or FAILED (dropped: fail, abandon, a failed COPY)
    int32_t error;         ///< the errno of a drop or of the COPY's failure, else 0
    uint32_t joined;       ///< faults that joined the claim while it was in flight
    int64_t copied;        ///< bytes installed
    uint64_t existed_pages;///< pages someone filled first (EEXIST), kept
    uint64_t end_ns;       ///< CLOCK_MONOTONIC time it ended
};

/// Claims `[dst, dst+len)` (aligned to `page_size`, 0: the base page) for a prefetch, leaving at
/// least `keep_free` entries of the table to faults. Returns 1: claimed, finish `*token` once
/// (complete, fail or abandon; `slot` receives the result and must live until then, or until
/// the table is cancelled); 0: overlaps a range in flight (nothing claimed); -ENOSPC: fewer
/// than keep_free + 1 entries free; -ESHUTDOWN: cancelled; -EINVAL: bad range.
int cuffd_deferred_claim(struct cuffd_deferred *d, uint64_t dst, uint64_t len, uint64_t page_size,
                         uint32_t keep_free, struct cuffd_prefetch_result *slot, uint64_t *token);

/// Drops the prefetch claim `token` (waiting for a delivery of it in progress to end) without
/// the fallback: wakes its range; `error` goes to its slot. Returns 0, -EINVAL when `token` is
/// a fault's fetch (left alone), or -ECANCELED/-ESTALE/-EALREADY when it had already ended.
int cuffd_deferred_abandon(struct cuffd_deferred *d, uint64_t token, int error);

/// Waits (up to timeout_ns) until fewer than `below` prefetch claims are in flight. Returns
/// how many are in flight then, or -ESHUTDOWN when the table was cancelled.
int cuffd_deferred_claims_wait(struct cuffd_deferred *d, uint32_t below, uint64_t timeout_ns);

/// Copies `slot` (of a claim of this table) to *out under the table's mutex; returns out->done.
int cuffd_deferred_claim_result(struct cuffd_deferred *d, const struct cuffd_prefetch_result *slot,
                                struct cuffd_prefetch_result *out);

// MARK: - Dirty tracking (WP_ASYNC + PAGEMAP_SCAN) ------------------------------------------

/// Opens /proc/self/pagemap read-only (close with close()).
int cuffd_pagemap_open(void);

/// PAGEMAP_SCAN for pages written since they were last write-protected in `[start, end)`.
/// Fills up to `vec_len` regions (start, end, categories); with `reprotect`, the reported
/// pages are write-protected again atomically (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC).
/// Returns the number of regions or -errno; `*walk_end` receives where the scan stopped
/// (< end when vec filled up: call again from there).
int cuffd_pagemap_scan_written(int pagemap_fd, uint64_t start, uint64_t end, bool reprotect,
                               struct page_region *vec, size_t vec_len, uint64_t *walk_end);

// MARK: - Huge-page coverage (PAGEMAP_SCAN PAGE_IS_HUGE) -------------------------------------

/// Opens /proc/PID/pagemap read-only (pid 0: this process), pinning that process's address
/// space for later scans; the fd or -errno (-ESRCH when there is no such process, -EACCES/-EPERM
/// without ptrace access to it).
int cuffd_pagemap_open_pid(int pid);

/// Bytes of `[start, start+len)` mapped by present huge pages in the address space of
/// `pagemap_fd` (from cuffd_pagemap_open_pid: THP PMDs and hugetlb pages, not the huge zero
/// page, not hugetlb entries without a page), or -errno (-ESRCH: that process is gone;
/// -EINVAL/-ENOTTY: no PAGEMAP_SCAN, kernels < 6.7).
int64_t cuffd_huge_bytes_fd(int pagemap_fd, uint64_t start, uint64_t len);

// MARK: - Memory helpers --------------------------------------------------------------------

/// Kinds of memory the tests and tools register.
enum cuffd_mem_kind {
    CUFFD_MEM_ANON = 0,          ///< MAP_PRIVATE|MAP_ANONYMOUS
    CUFFD_MEM_SHMEM = 1,         ///< memfd, MAP_SHARED (with an alias view)
    CUFFD_MEM_SHMEM_PRIVATE = 2, ///< memfd, MAP_PRIVATE (alias is MAP_SHARED)
    CUFFD_MEM_HUGETLB = 3,       ///< memfd MFD_HUGETLB, MAP_SHARED (with an alias view)
    CUFFD_MEM_HUGETLB_PRIVATE = 4, ///< memfd MFD_HUGETLB, MAP_PRIVATE (alias is MAP_SHARED)
};

/// Whether `kind` is backed by huge pages (its page size is the default huge page size).
static inline bool cuffd_mem_is_hugetlb(int kind) {
    return kind == CUFFD_MEM_HUGETLB || kind == CUFFD_MEM_HUGETLB_PRIVATE;
}

/// A mapped region; `alias` is a second MAP_SHARED view of the same file for shmem/hugetlb
/// (to fill the page cache for CONTINUE), NULL for anon.
struct cuffd_region {
    void *addr;
    void *alias;
    uint64_t len;
    uint64_t page_size;
    int memfd;      ///< -1 for anon
    int kind;
};

/// Maps `len` bytes of `kind`. `thp_align` aligns anon memory to 2 MiB. Returns 0 or -errno.
int cuffd_region_map(int kind, uint64_t len, bool thp_align, struct cuffd_region *out);

/// Unmaps and closes everything cuffd_region_map made.
void cuffd_region_unmap(struct cuffd_region *r);

/// Anonymous mapping aligned to `align` (a power of two >= page size). Returns NULL on failure.
void *cuffd_map_anon_aligned(uint64_t len, uint64_t align);

/// memfd_create(name, flags) as -errno / fd.
int cuffd_memfd_create(const char *name, unsigned flags);

/// Maps now, for reading (MADV_POPULATE_READ), the pages of the file mapping of `len` bytes at
/// `addr` that are in the page cache (mincore), in runs: pages not resident (a cold file on
/// disk, the holes of a tmpfs file) stay unmapped, so this never reads from disk (except a page
/// evicted between the two calls) and never allocates a tmpfs hole. `*populated` gets the bytes
/// mapped, stored atomically as it grows (another thread may read it with
/// cuffd_atomic_load_u64 meanwhile). A non-NULL `cancel` is read atomically between runs (a
/// run is at most 64 MiB): nonzero stops it with -ECANCELED. 0 or -errno (-EINVAL: the kernel
/// lacks MADV_POPULATE_READ; -EFAULT: the file shrank under the mapping).
int cuffd_populate_resident(void *addr, uint64_t len, uint64_t *populated, const int *cancel);

/// A relaxed atomic load of `*p` (a counter another thread stores with __atomic_store_n).
static inline uint64_t cuffd_atomic_load_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

/// A relaxed atomic store of `v` into `*p` (a flag another thread polls with __atomic_load_n).
static inline void cuffd_atomic_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

/// The calling thread's id.
pid_t cuffd_gettid(void);

/// The base page size.
uint64_t cuffd_page_size(void);

/// The default huge page size (from /proc/meminfo), 0 when unknown.
uint64_t cuffd_hugepage_size(void);

/// CLOCK_MONOTONIC in nanoseconds.
uint64_t cuffd_now_ns(void);

/// Pins the calling thread to one CPU; -errno on failure.
int cuffd_pin_self(int cpu);

/// The CPU the calling thread runs on.
int cuffd_current_cpu(void);

#ifdef __cplusplus
}
#endif

#include "cuffd_swift_support.h"
#include "cuffd_workingset.h"
#include "cuffd_sigbus.h"

#endif // CUFFD_H
