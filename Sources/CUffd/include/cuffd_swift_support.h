// Small helpers the Swift library (and its tests) need from C: things Swift cannot call
// directly (eventfd, thread names, fork-safe children, SIGBUS probing).
#ifndef CUFFD_SWIFT_SUPPORT_H
#define CUFFD_SWIFT_SUPPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/// A non-blocking, close-on-exec eventfd (the handler's stop fd). Returns the fd or -errno.
int cuffd_eventfd(void);

/// Adds 1 to an eventfd, making it readable. Returns 0 or -errno.
int cuffd_eventfd_signal(int fd);

/// Names the calling thread (15 characters at most are kept). Returns 0 or -errno.
int cuffd_set_thread_name(const char *name);

/// Reads the byte at `addr`, catching SIGBUS on the calling thread. Returns 0 and the byte in
/// `*value` when the read completed, 1 when it raised SIGBUS (e.g. a poisoned page).
/// A process-wide SIGBUS handler is installed on first use; SIGBUS on other threads that are
/// not inside this function is re-raised with the default action.
int cuffd_read_catching_sigbus(const volatile uint8_t *addr, uint8_t *value);

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

#ifdef __cplusplus
}
#endif

#endif // CUFFD_SWIFT_SUPPORT_H
