// C-level tests of the CUffd core, called from XCTest (Tests/CUffdTests).
//
// Each behaviour is one function `cuffd_test_<name>(mem_kind, msg, msglen)` that returns
// CUFFD_TEST_PASS / _FAIL / _SKIP and writes the reason into msg. Tests fault on registered
// memory and some expect SIGBUS, so they are meant to run through cuffd_test_run_isolated:
// a forked child with a watchdog, so a bug fails one test instead of hanging or killing the run.
#ifndef CUFFD_TEST_SUPPORT_H
#define CUFFD_TEST_SUPPORT_H

#include <stddef.h>

#include "CUffd.h"
#include "reliability.h"

#ifdef __cplusplus
extern "C" {
#endif

enum cuffd_test_result {
    CUFFD_TEST_PASS = 0,
    CUFFD_TEST_FAIL = 1,
    CUFFD_TEST_SKIP = 2,
};

/// One test: `mem_kind` is an enum cuffd_mem_kind (ignored by tests that have none).
typedef int (*cuffd_test_fn)(int mem_kind, char *msg, size_t msglen);

/// Runs `fn` in a forked child and waits at most `timeout_sec`. Timeout: the child is killed
/// and the result is FAIL "timed out". Death by a signal: FAIL naming the signal. Otherwise
/// the child's result and message (passed back through a pipe).
int cuffd_test_run_isolated(cuffd_test_fn fn, int mem_kind, int timeout_sec, char *msg,
                            size_t msglen);

/// Raises /proc/sys/vm/nr_hugepages so that at least `pages` default-size huge pages are free,
/// remembering the old value for cuffd_test_hugetlb_restore. Returns 0 or -errno (not root,
/// no hugetlb). Calls nest: only the outermost restore writes the old value back.
int cuffd_test_hugetlb_reserve(long pages);

/// Writes back the nr_hugepages value seen by the matching cuffd_test_hugetlb_reserve.
void cuffd_test_hugetlb_restore(void);

// MARK: - API and open (mem_kind ignored)
int cuffd_test_api_bad_version(int mem_kind, char *msg, size_t msglen);
int cuffd_test_api_unknown_feature(int mem_kind, char *msg, size_t msglen);
int cuffd_test_api_twice(int mem_kind, char *msg, size_t msglen);
int cuffd_test_open_paths(int mem_kind, char *msg, size_t msglen);
int cuffd_test_probe(int mem_kind, char *msg, size_t msglen);

// MARK: - Register
int cuffd_test_register_modes(int mem_kind, char *msg, size_t msglen);
int cuffd_test_register_busy(int mem_kind, char *msg, size_t msglen);

// MARK: - cuffd_resolve_one outcomes (RESOLVED, EXISTED, GONE, FALLBACK, FAILED)
int cuffd_test_resolve_one_outcomes(int mem_kind, char *msg, size_t msglen);

// MARK: - Resolve verbs
int cuffd_test_copy(int mem_kind, char *msg, size_t msglen);
int cuffd_test_copy_partial(int mem_kind, char *msg, size_t msglen);
int cuffd_test_copy_fault(int mem_kind, char *msg, size_t msglen);
int cuffd_test_copy_dontwake_wake(int mem_kind, char *msg, size_t msglen);
int cuffd_test_copy_mode_wp(int mem_kind, char *msg, size_t msglen);
int cuffd_test_zeropage(int mem_kind, char *msg, size_t msglen);
int cuffd_test_continue(int mem_kind, char *msg, size_t msglen);
int cuffd_test_poison(int mem_kind, char *msg, size_t msglen);

// MARK: - MOVE (anon only)
int cuffd_test_move_4k(int mem_kind, char *msg, size_t msglen);
int cuffd_test_move_thp(int mem_kind, char *msg, size_t msglen);
int cuffd_test_move_thp_nohuge_dst(int mem_kind, char *msg, size_t msglen);
int cuffd_test_move_thp_whole_nohuge_dst(int mem_kind, char *msg, size_t msglen);
int cuffd_test_move_src_holes(int mem_kind, char *msg, size_t msglen);
int cuffd_test_move_eexist(int mem_kind, char *msg, size_t msglen);
int cuffd_test_move_ebusy(int mem_kind, char *msg, size_t msglen);

// MARK: - Write-protect
int cuffd_test_wp(int mem_kind, char *msg, size_t msglen);
int cuffd_test_wp_unpopulated(int mem_kind, char *msg, size_t msglen);
int cuffd_test_wp_async_scan(int mem_kind, char *msg, size_t msglen);
int cuffd_test_wp_async_unpopulated(int mem_kind, char *msg, size_t msglen);

// MARK: - Events and fault modes
int cuffd_test_event_fork(int mem_kind, char *msg, size_t msglen);
int cuffd_test_event_remap(int mem_kind, char *msg, size_t msglen);
int cuffd_test_event_remove(int mem_kind, char *msg, size_t msglen);
int cuffd_test_event_unmap(int mem_kind, char *msg, size_t msglen);
int cuffd_test_eagain_while_remove_unread(int mem_kind, char *msg, size_t msglen);
int cuffd_test_sigbus_mode(int mem_kind, char *msg, size_t msglen);
int cuffd_test_thread_id_exact_address(int mem_kind, char *msg, size_t msglen);
int cuffd_test_address_masked(int mem_kind, char *msg, size_t msglen);

// MARK: - Fault loop
int cuffd_test_loop_threads(int mem_kind, char *msg, size_t msglen);
int cuffd_test_loop_fallback_poison(int mem_kind, char *msg, size_t msglen);
int cuffd_test_loop_fallback_zeropage(int mem_kind, char *msg, size_t msglen);
int cuffd_test_loop_stop_drains(int mem_kind, char *msg, size_t msglen);
int cuffd_test_loop_eagain_retry(int mem_kind, char *msg, size_t msglen);
/// EAGAIN after partial progress: the retry continues at start+done and the first bytes count.
int cuffd_test_loop_eagain_partial(int mem_kind, char *msg, size_t msglen);
/// Deferred resolution: OP_DEFER, single flight, finishing from another thread, deadline, late finishes, cancel.
int cuffd_test_deferred_loop(int mem_kind, char *msg, size_t msglen);
int cuffd_test_loop_eexist_wakes(int mem_kind, char *msg, size_t msglen);
int cuffd_test_loop_stop_under_load(int mem_kind, char *msg, size_t msglen);
int cuffd_test_loop_two_loops(int mem_kind, char *msg, size_t msglen);
int cuffd_test_loop_busy_poll(int mem_kind, char *msg, size_t msglen);
int cuffd_test_loop_minor(int mem_kind, char *msg, size_t msglen);
int cuffd_test_loop_wp(int mem_kind, char *msg, size_t msglen);
int cuffd_test_loop_dontwake_managed(int mem_kind, char *msg, size_t msglen);
int cuffd_test_loop_misdirected(int mem_kind, char *msg, size_t msglen);
int cuffd_test_loop_close_releases(int mem_kind, char *msg, size_t msglen);
int cuffd_test_loop_without_handshake(int mem_kind, char *msg, size_t msglen);

#ifdef __cplusplus
}
#endif

#endif // CUFFD_TEST_SUPPORT_H
