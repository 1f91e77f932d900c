// Helpers shared by the C tests: result macros, a fixture (uffd + region + source pages), a
// faulting thread, a minimal fault-handler thread, SIGBUS catching, page-state probes.
// Everything that waits is bounded; the runner's watchdog is the last line of defence.
#ifndef CT_H
#define CT_H

#include "CUffdTestSupport.h"

#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

// Inside a test: `msg`, `msglen` and `int rc` in scope and a label `out` that cleans up.
// A failure is reported to the runner at once, so a crash while cleaning up cannot hide it.
#define CT_FAIL(fmt, ...)                                                                    \
    do {                                                                                     \
        snprintf(msg, msglen, "%s:%d: " fmt, __FILE_NAME__, __LINE__, ##__VA_ARGS__);        \
        ct_report_early(msg);                                                                \
        rc = CUFFD_TEST_FAIL;                                                                \
        goto out;                                                                            \
    } while (0)
#define CT_CHECK(cond, fmt, ...)                                                             \
    do {                                                                                     \
        if (!(cond)) CT_FAIL(fmt, ##__VA_ARGS__);                                            \
    } while (0)
#define CT_SKIP(fmt, ...)                                                                    \
    do {                                                                                     \
        snprintf(msg, msglen, fmt, ##__VA_ARGS__);                                           \
        rc = CUFFD_TEST_SKIP;                                                                \
        goto out;                                                                            \
    } while (0)
// Propagates a non-PASS result of a helper that already wrote msg.
#define CT_TRY(expr)                                                                         \
    do {                                                                                     \
        int ct_r_ = (expr);                                                                  \
        if (ct_r_ != CUFFD_TEST_PASS) {                                                      \
            rc = ct_r_;                                                                      \
            goto out;                                                                        \
        }                                                                                    \
    } while (0)

/// Sends a failure message to the runner now (no-op outside an isolated run).
void ct_report_early(const char *msg);
/// Set when a thread was left blocked (a join timed out): cleanup then leaves memory mapped,
/// since that thread may still touch it; the test process exits right after anyway.
extern atomic_int ct_abandoned;

#define CT_WAIT_MS 5000 // how long a test waits for any one expected thing

const char *ct_kind_name(int kind);

// MARK: the table
/// Memory-type bits of a row (`mems`).
#define CT_M(kind) (1u << (kind))
#define CT_M_ANON CT_M(CUFFD_MEM_ANON)
#define CT_M_SHMEM CT_M(CUFFD_MEM_SHMEM)
#define CT_M_SHMEM_PRIVATE CT_M(CUFFD_MEM_SHMEM_PRIVATE)
#define CT_M_HUGETLB CT_M(CUFFD_MEM_HUGETLB)
#define CT_M_HUGETLB_PRIVATE CT_M(CUFFD_MEM_HUGETLB_PRIVATE)
#define CT_M_HUGE (CT_M_HUGETLB | CT_M_HUGETLB_PRIVATE)
#define CT_M_FILES (CT_M_SHMEM | CT_M_SHMEM_PRIVATE | CT_M_HUGE)
#define CT_M_ALL (CT_M_ANON | CT_M_FILES)

/// Row features that depend on the memory type (bits the kernel's feature word does not use).
#define CT_F_WP (1ull << 63)        ///< PAGEFAULT_FLAG_WP on anon, WP_HUGETLBFS_SHMEM on files
#define CT_F_WP_FILE (1ull << 62)   ///< WP_HUGETLBFS_SHMEM on files, nothing on anon
#define CT_F_MINOR (1ull << 61)     ///< MINOR_SHMEM / MINOR_HUGETLBFS; nothing on anon
#define CT_F_MOVE_ANON (1ull << 60) ///< MOVE on anon, nothing on files
#define CT_F_ALL (CT_F_WP | CT_F_WP_FILE | CT_F_MINOR | CT_F_MOVE_ANON)

/// Whether `kind` is backed by huge pages.
static inline bool ct_is_hugetlb(int kind) { return cuffd_mem_is_hugetlb(kind); }
/// A file mapped shared (writes reach the file) / mapped private (copy-on-write over it).
static inline bool ct_is_shared_file(int kind) {
    return kind == CUFFD_MEM_SHMEM || kind == CUFFD_MEM_HUGETLB;
}
static inline bool ct_is_private_file(int kind) {
    return kind == CUFFD_MEM_SHMEM_PRIVATE || kind == CUFFD_MEM_HUGETLB_PRIVATE;
}
/// The most huge pages one fixture maps (the test class reserves a few fixtures' worth).
#define CT_HUGE_MAX_PAGES 8

/// The UFFD_FEATURE_* bits a row's `features` mean on `kind`.
uint64_t ct_case_features(int kind, uint64_t features);

/// A file's rows, ended by an empty one: `CT_CASES(fill) = { {...}, ... CT_END };`
#define CT_CASES(group) const struct cuffd_test_case ct_cases_##group[]
#define CT_END {0}
const char *ct_err(int neg_errno); // "EAGAIN", "EEXIST", ... for -errno or errno

/// The pattern every source page carries: page index and offset both matter.
static inline uint8_t ct_pat(size_t page, size_t off) {
    return (uint8_t)((page * 37 + (off >> 9) * 3) | 1);
}
void ct_fill_pattern(char *p, size_t ps, size_t page);
/// -1 when page matches the pattern for `page`, else the first bad offset.
long ct_check_pattern(const char *p, size_t ps, size_t page);
/// -1 when all zero, else the first non-zero offset.
long ct_check_zero(const char *p, size_t ps);

/// 1 when the page containing addr is mapped in this process (pagemap present/swapped bit),
/// 0 when not, -errno on error.
int ct_present(const void *addr);

// MARK: fixture
struct ct_fix {
    int kind;
    int uffd;
    uint64_t features; ///< enabled on uffd
    uint64_t avail;    ///< the kernel's
    struct cuffd_region r;
    uint64_t ps;       ///< page size of the region (huge for hugetlb)
    size_t npages;
    char *base;        ///< r.addr
    char *alias;       ///< r.alias (NULL for anon)
    char *src;         ///< npages pattern pages, anon, unregistered
};

/// Opens a non-blocking uffd with `features` (SKIP naming the missing ones), maps npages of
/// `kind` and a pattern source. On non-PASS, msg says why and the fixture is cleaned up.
int ct_fix_init(struct ct_fix *f, int kind, size_t npages, uint64_t features, char *msg,
                size_t msglen);
void ct_fix_fini(struct ct_fix *f);
/// SKIP text naming the features in `want` the kernel lacks; 0 when none lacks.
int ct_need_features(uint64_t want, char *msg, size_t msglen);
/// The outcome of the test class's huge page reservation: 0, -errno, or 1 when never tried.
int ct_hugetlb_reserve_error(void);
/// Free default-size huge pages nobody has reserved (HugePages_Free - HugePages_Rsvd), or -1.
long ct_hugetlb_available(void);
/// In a forked child standing for another test run: forgets the leases inherited from the parent.
void ct_hugetlb_forget_leases(void);
/// Maps a region with SKIP when hugetlb pages are not available.
int ct_map(int kind, uint64_t len, struct cuffd_region *r, char *msg, size_t msglen);

// MARK: threads
/// Joins with a bound: 0, or -ETIMEDOUT (the thread is left; the test process exits anyway).
int ct_join(pthread_t th, int timeout_ms);

/// A thread that touches `count` pages of size `stride` from `addr`: reads (summing) or writes
/// `wval`. With catch_sigbus, a SIGBUS ends the touching and is recorded.
struct ct_toucher {
    pthread_t th;
    char *addr;
    size_t count;
    size_t stride;
    int write;
    uint8_t wval;
    int catch_sigbus;
    volatile uint64_t sum;
    volatile pid_t tid;
    atomic_int started;
    atomic_int finished;
    int sigbus;
    void *sigbus_addr;
    size_t touched; ///< pages completed
};
int ct_touch_start(struct ct_toucher *t);
/// 0 when the thread finished within timeout_ms, else -ETIMEDOUT.
int ct_touch_join(struct ct_toucher *t, int timeout_ms);

/// Touches one byte in the calling thread with SIGBUS caught: 0 done, 1 SIGBUS (address in
/// *fault_addr).
int ct_touch_catch(volatile char *p, int write, uint8_t wval, uint8_t *read_val, void **fault_addr);

// A minimal fault handler: poll, read, resolve each page fault, log every message.
enum ct_action { CT_H_NONE, CT_H_COPY, CT_H_ZERO, CT_H_CONTINUE, CT_H_UNPROTECT };
#define CT_MAX_LOG 256
struct ct_handler {
    pthread_t th;
    int uffd;
    int action;
    uint64_t ps;
    char *base;      ///< page index = (addr - base) / ps selects the source page
    size_t npages;
    const char *src;
    atomic_int stop;
    atomic_int nlog;
    struct uffd_msg log[CT_MAX_LOG];
    atomic_int errors;
    int first_err;   ///< -errno of the first failed resolution
};
int ct_handler_start(struct ct_handler *h, const struct ct_fix *f, int action);
/// Stops and joins (bounded). 0 or -ETIMEDOUT.
int ct_handler_stop(struct ct_handler *h);
/// Waits until at least n messages were logged; true when they were.
bool ct_handler_wait(struct ct_handler *h, int n, int timeout_ms);
/// Page-fault messages whose flags contain `all` and none of `none`.
int ct_handler_faults(struct ct_handler *h, uint64_t all, uint64_t none);

/// Waits until *flag is non-zero: true when it was within timeout_ms.
/// Used before fork() under EVENT_FORK: the thread that is to read the FORK message must be
/// running first. fork() waits in the kernel until the message is read, and a sanitizer's fork()
/// does so holding the sanitizer's locks, which a thread still starting up needs: deadlock.
bool ct_wait_flag(atomic_int *flag, int timeout_ms);

/// Reads one message, waiting up to timeout_ms: 1 read, 0 timeout, -errno.
int ct_read_msg(int uffd, struct uffd_msg *m, int timeout_ms);

/// The thread that reads the FORK message a fork() under EVENT_FORK waits for: set uffd and
/// got = -1, start ct_fork_reader_main on it, ct_wait_flag(&running) before fork(), join, then
/// got (1 read, 0 timeout, -errno) and m say what came.
struct ct_fork_reader {
    pthread_t th;
    int uffd;
    int got;
    atomic_int running;
    struct uffd_msg m;
};
void *ct_fork_reader_main(void *arg);

/// The uffd-wp bit of a /proc/PID/pagemap entry ("Bit 57 pte is uffd-wp write-protected",
/// Documentation/admin-guide/mm/pagemap.rst; no uapi header names it).
#define CT_PM_UFFD_WP (1ull << 57)
#define CT_PM_PRESENT (1ull << 63) ///< "Bit 63 page present" (a marker is not)
/// The calling process's pagemap entry for the page holding addr: 0 or -errno.
/// Async-signal-safe (open/pread/close only), so a forked child may call it.
int ct_pagemap_entry(const void *addr, uint64_t *entry);

/// Drops pages [first, first+n) of the fixture so the next access faults as missing: MADV_REMOVE
/// for shared file memory (the page cache goes too), MADV_DONTNEED otherwise. 0 or -errno.
int ct_release(struct ct_fix *f, size_t first, size_t n);

/// Value of a "Key:   N kB" line of /proc/self/smaps for the VMA containing addr (-1: not found).
long ct_smaps_kb(const void *addr, const char *key);

/// True once every thread in tids sleeps (state S or D in /proc/self/task/TID/stat), e.g.
/// blocked on a page fault; false after timeout_ms.
bool ct_wait_blocked(const pid_t *tids, int n, int timeout_ms);

#endif // CT_H
