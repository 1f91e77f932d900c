// Test-only helpers for the Swift tests (UffdKitTests, ReliabilityTests).
#ifndef SWIFT_HELPERS_H
#define SWIFT_HELPERS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Forks a child that sums the bytes of `[addr, addr+len)` (one byte each `stride`) and
/// reports the sum through a pipe. Returns 0 with `*sum`, -ETIMEDOUT (the child is killed
/// after `timeout_ms`), or another -errno. The child only reads memory and calls _exit.
int cuffd_fork_and_sum(const void *addr, uint64_t len, uint64_t stride, int timeout_ms,
                       uint64_t *sum);

/// Forks a child that opens its own userfaultfd, registers `len` bytes of fresh anonymous
/// memory for MISSING faults, never handles them, and touches the first page. After
/// `timeout_ms` the parent checks whether the child is still blocked, kills it, and reaps it.
/// Returns 1 when the child was still blocked (the expected behaviour of an unanswered fault),
/// 0 when it exited by itself, or -errno (setup failed; the child's failure code is reported
/// as -(100 + step)).
int cuffd_child_blocks_when_unhandled(uint64_t len, int timeout_ms);

/// mremap(2) of `[old, old+len)` to exactly `new_addr` (MREMAP_MAYMOVE|MREMAP_FIXED); mremap is
/// variadic and does not reach Swift. Returns 0 or -errno.
int cuffd_mremap_fixed(void *old_addr, uint64_t len, void *new_addr);

/// Whether the file behind `fd` is in tmpfs (every page in memory): 1 yes, 0 no, or -errno of
/// fstatfs.
int cuffd_fd_in_memory(int fd);

/// Forks a child that maps `len` bytes of private anonymous memory (hugetlb when `hugetlb`),
/// writes the first `touch` bytes, reports the mapping's address in `*addr` and sleeps until
/// killed (at most 60 s: alarm). Returns the child's pid (end it with cuffd_kill_child), or
/// -errno, or -(100 + step) when the child's set-up failed (101: mmap, e.g. no huge pages).
int cuffd_fork_memory_child(uint64_t len, int hugetlb, uint64_t touch, uint64_t *addr);

/// SIGKILLs and reaps `pid`; 0 or -errno.
int cuffd_kill_child(int pid);

#ifdef __cplusplus
}
#endif

#endif // SWIFT_HELPERS_H
