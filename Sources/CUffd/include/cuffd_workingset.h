// Per-page state shared by the fault path (working-set recording, prefetch accounting) and the
// prefetch filler: one byte per page, changed with atomic OR so neither side takes a lock.
#ifndef CUFFD_WORKINGSET_H
#define CUFFD_WORKINGSET_H

#include <stdint.h>
#include <stddef.h>

/// A fault asked for the page (set by the policy wrapper on the reader thread).
#define CUFFD_PAGE_FAULTED ((uint8_t)1)
/// The prefetch filler installed the page (set after its UFFDIO_COPY succeeded).
#define CUFFD_PAGE_PREFETCHED ((uint8_t)2)

/// Sets `bits` in `states[index]`; returns the byte before (relaxed: only the bits matter).
static inline uint8_t cuffd_page_state_set(uint8_t *states, size_t index, uint8_t bits) {
    return __atomic_fetch_or(states + index, bits, __ATOMIC_RELAXED);
}

/// Reads `states[index]` (relaxed).
static inline uint8_t cuffd_page_state_get(const uint8_t *states, size_t index) {
    return __atomic_load_n(states + index, __ATOMIC_RELAXED);
}

#endif // CUFFD_WORKINGSET_H
