// C-level tests of the CUffd core, called from XCTest (Tests/CUffdTests).
//
// Each behaviour is one function `int t_<name>(struct ct_fix *f, char *msg, size_t msglen)`
// returning CUFFD_TEST_PASS / _FAIL / _SKIP (reason in msg) and one row in its file's table
// (CT_CASES at the end of each ct_*.c). Tests fault on registered memory and some expect
// SIGBUS, so each case runs in a forked child with a watchdog (cuffd_test_run_case): a bug
// fails one case instead of hanging or killing the run.
#ifndef CUFFD_TEST_SUPPORT_H
#define CUFFD_TEST_SUPPORT_H

#include <stddef.h>
#include <stdint.h>

#include "CUffd.h"
#include "reliability.h"
#include "swift_helpers.h"

#ifdef __cplusplus
extern "C" {
#endif

enum cuffd_test_result {
    CUFFD_TEST_PASS = 0,
    CUFFD_TEST_FAIL = 1,
    CUFFD_TEST_SKIP = 2,
};

struct ct_fix;

/// One row of the C test table (like the kernel's uffd_tests[]): a behaviour, the memory types
/// it runs on and the userfaultfd features it needs. The runner maps the fixture (uffd with the
/// features, `npages` pages of the memory type, a pattern source) before calling `fn` and
/// unmaps it after; a missing feature or memory type skips with the reason.
struct cuffd_test_case {
    const char *name;  ///< the behaviour; logged as `name_memtype` (e.g. copy_shmem_private)
    int (*fn)(struct ct_fix *f, char *msg, size_t msglen);
    unsigned mems;     ///< bit (1 << enum cuffd_mem_kind) per memory type; 0: none (runs once)
    uint64_t features; ///< UFFD_FEATURE_* bits, plus CT_F_* bits resolved per memory type
    size_t npages;     ///< fixture pages; 0: no fixture (the test maps what it needs)
    const char *doc;   ///< one sentence: what the behaviour is
};

/// The table's groups (one per C file): count, name, and the cases of group `g`.
size_t cuffd_test_group_count(void);
const char *cuffd_test_group_name(size_t g);
size_t cuffd_test_case_count(size_t g);
const struct cuffd_test_case *cuffd_test_case_at(size_t g, size_t i);

/// `name_memtype` for a case on a memory type (just `name` when the case has none).
void cuffd_test_case_label(const struct cuffd_test_case *c, int mem_kind, char *out, size_t outlen);

/// The suffix for a memory type: anon, shmem, shmem_private, hugetlb, hugetlb_private.
const char *cuffd_test_mem_name(int mem_kind);

/// Runs one case on `mem_kind` in a forked child and waits at most `timeout_sec`. Timeout: the
/// child is killed and the result is FAIL "timed out". Death by a signal: FAIL naming the
/// signal. Otherwise the child's result and message (passed back through a pipe).
int cuffd_test_run_case(const struct cuffd_test_case *c, int mem_kind, int timeout_sec, char *msg,
                        size_t msglen);

/// Leases `pages` default-size huge pages: adds them to /proc/sys/vm/nr_hugepages under a
/// machine-wide lock (other test runs on the machine lease theirs beside ours). Returns 0 when at
/// least `pages` unreserved huge pages are free afterwards, or -errno (not root, no hugetlb,
/// -ENOMEM: the kernel could not find the memory). Every call, successful or not, is matched by
/// one cuffd_test_hugetlb_restore; leases nest.
int cuffd_test_hugetlb_reserve(long pages);

/// Ends the innermost lease: gives back exactly the pages it added (pages still mapped are freed
/// by the kernel when their last user lets go).
void cuffd_test_hugetlb_restore(void);

#ifdef __cplusplus
}
#endif

#endif // CUFFD_TEST_SUPPORT_H
