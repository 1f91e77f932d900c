// In-thread resolution benchmark kernels (UFFD_FEATURE_SIGBUS), part of CUffdBench.
#ifndef CUBENCH_SIGBUS_H
#define CUBENCH_SIGBUS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct cubench_result;

/// The op of an in-thread run.
enum cubench_sigbus_op {
    CUBENCH_SIGBUS_COPY = 0,     ///< UFFDIO_COPY 4 KiB from a filled source (write faults)
    CUBENCH_SIGBUS_ZEROPAGE = 1, ///< UFFDIO_ZEROPAGE (read faults)
};

/// Who resolves the SIGBUS.
enum cubench_sigbus_resolver {
    CUBENCH_SIGBUS_PLAIN = 0, ///< a hand-written handler: range check + one ioctl (the limit)
    CUBENCH_SIGBUS_CUFFD = 1, ///< cuffd_sigbus_* (table lookup, policy, outcome model, stats)
};

struct cubench_sigbus_params {
    uint64_t pages;        ///< 4 KiB pages, one fault each
    uint32_t op;           ///< enum cubench_sigbus_op
    uint32_t resolver;     ///< enum cubench_sigbus_resolver
    int32_t fault_cpu;     ///< the faulting thread's CPU (-1: unpinned)
    uint32_t timeout_ms;   ///< 0: 20000
    uint32_t range_flags;  ///< CUBENCH_SIGBUS_CUFFD: the range's enum cuffd_sigbus_flags (CUFFD_SIGBUS_LATENCY)
};

/// One thread touches every page of a MISSING range of a UFFD_FEATURE_SIGBUS uffd; each fault is
/// resolved in that thread's SIGBUS handler. The previous SIGBUS action is back afterwards.
/// -EILSEQ when the data is wrong, -errno of the first failed resolution.
int cubench_sigbus(const struct cubench_sigbus_params *p, struct cubench_result *out);

#ifdef __cplusplus
}
#endif

#endif // CUBENCH_SIGBUS_H
