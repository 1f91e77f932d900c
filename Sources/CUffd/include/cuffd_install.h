// Window installer: lazy loading at the speed of memory (issue 14).
//
// The destination (registered MISSING on `uffd`, in this process) is cut into windows (2 MiB by
// default, the PMD size). A window is installed whole, once: its bytes are read by a fill
// callback into a private donor (2 MiB aligned, MADV_HUGEPAGE, MADV_DONTFORK, so a huge page
// backs it) and the donor is moved into place with UFFDIO_MOVE: into a THP-eligible destination
// the PMD moves whole, no byte is copied twice and the memory ends up backed by huge pages.
// A move that fails (EBUSY, ENOENT, EEXIST, EINVAL, a window shorter than the donor) falls back
// for that window to UFFDIO_COPY from the donor, continuing where the move stopped, page by
// page past pages that exist (EEXIST) or lie outside a registered VMA (ENOENT); with
// CUFFD_INSTALL_COPY it always copies (destination not THP-eligible, THP off).
//
// Pipelining: up to `fillers` prefetch threads install the windows after a sequential stream
// (a fault in window w while window w-1 is installed) `ahead` windows ahead of it, in parallel
// with the faulting threads; the fault path itself only installs the window it faulted in.
//
// Waking: every install wakes its window whatever the outcome, so a fault on a window another
// thread is installing needs nothing (cuffd_installer_install returns 0 at once). No
// allocation on the install path; the prefetch queue takes a mutex once per stream step
// (per window, not per page).
#ifndef CUFFD_INSTALL_H
#define CUFFD_INSTALL_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Fills `[dst, dst+len)` with the image bytes at `offset` (bytes past the image's end are
/// zeros). Called on installing threads, several at once. 0 or -errno.
typedef int (*cuffd_fill_fn)(void *ctx, uint64_t offset, void *dst, uint64_t len);

enum cuffd_install_flags {
    CUFFD_INSTALL_COPY = 1 << 0, ///< never MOVE: UFFDIO_COPY from the donor (one copy)
};

struct cuffd_installer_config {
    int uffd;                 ///< the userfaultfd the destination is registered on (MISSING)
    uint64_t start;           ///< destination start, a multiple of `window`
    uint64_t len;             ///< destination bytes, a multiple of the base page
    uint64_t window;          ///< bytes per window, a power of two >= the base page; 0: 2 MiB
    cuffd_fill_fn fill;       ///< reads the image
    void *ctx;                ///< passed to fill
    uint32_t flags;           ///< enum cuffd_install_flags
    uint32_t fillers;         ///< prefetch threads (0: none, at most 4)
    uint32_t ahead;           ///< windows a stream is prefetched ahead; 0: 8
    uint32_t slots;           ///< donors for installs at once (fault path + fillers); 0: fillers + 4, at most 64
    int32_t filler_cpus[4];   ///< CPU per filler; -1 (or any negative): not pinned
};

struct cuffd_installer_stats {
    uint64_t moved;       ///< windows installed whole by UFFDIO_MOVE
    uint64_t copied;      ///< windows installed by UFFDIO_COPY (copy mode or a fallback)
    uint64_t fallbacks;   ///< moves that failed and were completed by COPY
    uint64_t prefetched;  ///< windows installed by the fillers
    uint64_t joined;      ///< faults on a window another thread was installing (nothing to do)
    uint64_t stale;       ///< faults on an installed window (a page dropped later): one page copied
    uint64_t failed;      ///< installs that failed (fill or ioctl error); the window was woken
    uint64_t bytes;       ///< bytes installed (moved or copied; pages found in place not counted)
    uint64_t alloc_ns;    ///< time populating donors (MADV_POPULATE_WRITE: a zeroed huge page each)
    uint64_t fill_ns;     ///< time in the fill callback (reading the image into donors)
    uint64_t place_ns;    ///< time moving/copying donors into place (and fallbacks)
};

struct cuffd_installer;

/// Maps the donors, starts the fillers. 0 or -errno (EINVAL: a bad config; ENOMEM).
int cuffd_installer_create(const struct cuffd_installer_config *cfg, struct cuffd_installer **out);

/// Installs the window holding `addr` (a faulting address) unless it is installed or being
/// installed. 0 when the faulting page is (or will be, by another thread) resolved and woken,
/// or the range will be re-faulted (EAGAIN: an event must be read first; the window was woken);
/// -errno when it could not be: the caller resolves the page (its fallback). Thread-safe.
int cuffd_installer_install(struct cuffd_installer *in, uint64_t addr);

/// Installs window `index` without a fault (a prefetch filler of the caller's own). 0, 1 when
/// it was already installed or being installed, or -errno.
int cuffd_installer_prefetch(struct cuffd_installer *in, uint64_t index);

/// Marks the windows overlapping `[start, start+len)` not installed (after a REMOVE or UNMAP
/// event: a later fault installs them again, by COPY where pages remain).
void cuffd_installer_forget(struct cuffd_installer *in, uint64_t start, uint64_t len);

/// Stops and joins the fillers (no more prefetch; installs on the fault path still work).
void cuffd_installer_stop(struct cuffd_installer *in);

/// A snapshot of the counters (summed over threads; relaxed).
void cuffd_installer_stats(const struct cuffd_installer *in, struct cuffd_installer_stats *out);

/// Stops the fillers, unmaps the donors, frees. NULL is ignored.
void cuffd_installer_destroy(struct cuffd_installer *in);

/// Bytes of `[start, start+len)` of this process mapped by present huge pages (cuffd_huge_bytes_fd
/// on /proc/self/pagemap: THP PMDs and hugetlb), the "AnonHugePages" of a range. -errno on
/// failure (EINVAL/ENOTTY: no PAGEMAP_SCAN, kernels < 6.7).
int64_t cuffd_huge_bytes(uint64_t start, uint64_t len);

/// Whether THP can back anonymous memory of this process: 1 when
/// /sys/kernel/mm/transparent_hugepage/enabled is `always` or `madvise` (then `madvised` says
/// whether it needs MADV_HUGEPAGE) and prctl(PR_GET_THP_DISABLE) is off; 0 when not.
int cuffd_thp_available(int *madvised);

/// Whether THP can back the anonymous VMA holding `addr`: THP available (cuffd_thp_available),
/// the VMA not MADV_NOHUGEPAGE, and MADV_HUGEPAGE when the system setting is `madvise`
/// (/proc/self/smaps VmFlags). 1 or 0; -ENOENT when no VMA holds `addr`.
int cuffd_thp_eligible(uint64_t addr);

/// prctl(PR_SET_THP_DISABLE): no transparent huge pages for this process (`disable`) or the
/// system setting again. 0 or -errno.
int cuffd_set_thp_disable(bool disable);

#ifdef __cplusplus
}
#endif

#endif // CUFFD_INSTALL_H
