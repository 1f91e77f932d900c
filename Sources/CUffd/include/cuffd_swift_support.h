// Small helpers the Swift library, its tests and benchmarks need from C: things Swift cannot
// call directly (eventfd, thread names), the one SIGBUS catcher and the one deadline helper.
#ifndef CUFFD_SWIFT_SUPPORT_H
#define CUFFD_SWIFT_SUPPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <pthread.h>
#include <sys/types.h>
#include <time.h>

#ifdef __cplusplus
extern "C" {
#endif

/// A non-blocking, close-on-exec eventfd (the handler's stop fd). Returns the fd or -errno.
int cuffd_eventfd(void);

/// Adds 1 to an eventfd, making it readable. Returns 0 or -errno.
int cuffd_eventfd_signal(int fd);

/// Names the calling thread (15 characters at most are kept). Returns 0 or -errno.
int cuffd_set_thread_name(const char *name);

// MARK: - Accesses that may raise SIGBUS/SIGSEGV (poisoned pages, SIGBUS mode, unmapped ranges)

/// What cuffd_access_catching does at `addr`.
enum cuffd_access_op {
    CUFFD_ACCESS_READ8 = 0,  ///< reads one byte into *value
    CUFFD_ACCESS_WRITE8 = 1, ///< writes the low byte of `operand`
    CUFFD_ACCESS_READ64 = 2, ///< reads the aligned 64-bit word into *value
    CUFFD_ACCESS_ADD64 = 3,  ///< adds `operand` to the aligned 64-bit word; *value gets the sum
};

/// Performs one access at `addr`, catching SIGBUS (and SIGSEGV when `catch_segv`) raised by
/// that access on the calling thread. Returns 0 when it completed, or the signal number
/// (SIGBUS/SIGSEGV) with the faulting address in `*fault_addr` (may be NULL).
/// Handlers for SIGBUS and SIGSEGV are installed once per process; a signal that arrives
/// outside such an access is passed on to the handler that was installed before (or gets the
/// default action), so the process's own crash handling keeps working.
int cuffd_access_catching(volatile void *addr, int op, uint64_t operand, bool catch_segv,
                          uint64_t *value, void **fault_addr);

/// Reads the byte at `addr` with SIGBUS caught (cuffd_access_catching). Returns 0 and the
/// byte in `*value`, or 1 when the read raised SIGBUS.
int cuffd_read_catching_sigbus(const volatile uint8_t *addr, uint8_t *value);

// MARK: - Bounded waits

/// The absolute CLOCK_REALTIME time `ms` from now (what pthread_timedjoin_np and
/// sem_timedwait take).
struct timespec cuffd_deadline_after_ms(uint32_t ms);

/// pthread_join with a bound of `ms`: 0, or -ETIMEDOUT (the thread keeps running) / -errno.
int cuffd_join_within(pthread_t thread, uint32_t ms);

#ifdef __cplusplus
}
#endif

#endif // CUFFD_SWIFT_SUPPORT_H
