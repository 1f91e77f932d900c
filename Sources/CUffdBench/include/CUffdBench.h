// CUffdBench: benchmark kernels in C. Baselines (no userfaultfd), minimal hand-written handlers
// (the kernel's limit for a user-space handler), the same operations through the project's fault
// loop (cuffd_loop_run), bulk resolutions, placement, a heap-compaction workload and a lazy file
// load.
//
// Every kernel is self-contained: it maps what it needs, measures, unmaps and closes everything
// before returning, and is bounded: faulting threads are joined with a timeout; on a timeout the
// handlers are stopped, the range is unregistered (which wakes any blocked faulting thread) and
// the kernel returns -ETIMEDOUT. Every function returns 0 or -errno; results go to an out-struct.
#ifndef CUFFD_BENCH_H
#define CUFFD_BENCH_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// At most this many faulting threads and this many handler threads per run.
#define CUBENCH_MAX_THREADS 8

/// Where threads run. A CPU of -1 leaves the thread unpinned. With `spread`, thread i of a kind
/// runs on (cpu + i) % ncpus instead of all threads of that kind on `cpu`.
struct cubench_placement {
    int32_t handler_cpu;     ///< CPU of handler thread 0 (-1: unpinned)
    int32_t fault_cpu;       ///< CPU of faulting thread 0 (-1: unpinned)
    uint32_t fault_threads;  ///< 1..CUBENCH_MAX_THREADS faulting threads (each touches its slice)
    uint32_t handler_threads;///< 1..CUBENCH_MAX_THREADS handler threads on the same uffd
    uint32_t spread_handlers;///< 1: handler i on (handler_cpu + i) % ncpus
    uint32_t spread_faults;  ///< 1: faulting thread i on (fault_cpu + i) % ncpus
};

/// What one kernel run measured.
struct cubench_result {
    uint64_t ns;        ///< wall time of the measured section (first fault .. last thread done)
    uint64_t bytes;     ///< bytes made accessible / copied / loaded
    uint64_t pages;     ///< bytes / 4096
    uint64_t faults;    ///< faults the handlers resolved (0 for baselines)
    uint64_t ioctls;    ///< resolving ioctls issued
    uint64_t checksum;  ///< sum of bytes read, so the optimizer keeps the reads (and a sanity check)
};

// MARK: - Baselines (no userfaultfd) ----------------------------------------------------------

/// First-touch write fault on fresh anonymous memory (MADV_NOHUGEPAGE: 4 KiB faults), one byte
/// per page, `pages` pages, on placement->fault_cpu with placement->fault_threads threads.
int cubench_first_touch(uint64_t pages, const struct cubench_placement *pl, struct cubench_result *out);

/// MADV_POPULATE_WRITE of `pages` fresh anonymous pages (MADV_NOHUGEPAGE), on fault_cpu.
int cubench_populate_write(uint64_t pages, const struct cubench_placement *pl, struct cubench_result *out);

/// memcpy of 4 KiB, `pages` times, between two populated buffers of `pages` pages, on fault_cpu.
int cubench_memcpy_4k(uint64_t pages, const struct cubench_placement *pl, struct cubench_result *out);

// MARK: - Userfaultfd resolutions ----------------------------------------------------------------

/// The resolving operation.
enum cubench_op {
    CUBENCH_OP_COPY = 0,     ///< MISSING anon, UFFDIO_COPY from a filled source buffer
    CUBENCH_OP_ZEROPAGE = 1, ///< MISSING anon, UFFDIO_ZEROPAGE (read faults)
    CUBENCH_OP_CONTINUE = 2, ///< MINOR shmem, page cache filled through the alias view
    CUBENCH_OP_WP = 3,       ///< populated anon, write-protected; writes fault; WRITEPROTECT clear
    CUBENCH_OP_MOVE = 4,     ///< MISSING anon, UFFDIO_MOVE from a populated MADV_DONTFORK donor
};

/// Who resolves the faults.
enum cubench_handler {
    CUBENCH_HANDLER_MINIMAL = 0, ///< poll + read one msg + one ioctl, nothing else
    CUBENCH_HANDLER_LOOP = 1,    ///< cuffd_loop_run with a C decide callback
};

/// Memory flags for the bulk cases.
enum cubench_flags {
    CUBENCH_THP_SOURCE = 1 << 0,  ///< MOVE donor: 2 MiB-aligned, MADV_HUGEPAGE, populated
    CUBENCH_THP_DEST = 1 << 1,    ///< destination 2 MiB-aligned and MADV_HUGEPAGE
    CUBENCH_NOHUGE_DEST = 1 << 2, ///< destination MADV_NOHUGEPAGE (the default for 4 KiB cases)
    CUBENCH_PRIME = 1 << 3,       ///< cubench_prime_memory(region bytes) right before the timed section
};

/// One userfaultfd resolution benchmark.
struct cubench_uffd_params {
    uint64_t pages;          ///< 4 KiB pages in the registered region (rounded up to whole windows)
    uint32_t op;             ///< enum cubench_op
    uint32_t handler;        ///< enum cubench_handler
    uint64_t window;         ///< bytes resolved per fault (4096, 65536, 2 MiB); power of two
    uint32_t flags;          ///< enum cubench_flags
    uint32_t timeout_ms;     ///< watchdog for the whole measured section (0: 20000)
    struct cubench_placement placement;
};

/// Faulting threads touch one byte of every 4 KiB page of their slice (write; read for
/// ZEROPAGE); handlers resolve `window` bytes per fault. Setup (mapping, filling sources and the
/// page cache, populating, write-protecting) is outside the measured section.
/// -EOPNOTSUPP when the kernel lacks the feature the op needs.
int cubench_uffd(const struct cubench_uffd_params *p, struct cubench_result *out);

// MARK: - Faulting threads over memory served elsewhere ----------------------------------------

/// Called on the watchdog path with the caller's context: it must stop whatever serves the
/// faults and unregister the range (which wakes every blocked faulting thread).
typedef void (*cubench_unblock_fn)(void *ctx);

/// The faulting side of cubench_uffd over memory the caller set up and serves (e.g. a UffdKit
/// FaultHandler): `placement->fault_threads` threads pinned as cubench_uffd pins them each touch
/// one byte of every 4 KiB page of their slice (slices are whole `granule`s), a write unless
/// `write` is 0. out->ns is the measured section (first touch .. last thread done); bytes and
/// pages describe `len`. On the deadline `unblock(ctx)` runs, every thread is joined, and the
/// result is -ETIMEDOUT.
int cubench_touch(void *base, uint64_t len, uint64_t granule, const struct cubench_placement *placement,
                  uint32_t write, uint32_t timeout_ms, cubench_unblock_fn unblock, void *ctx,
                  struct cubench_result *out);

/// Sum of the byte at `offset` of every 4 KiB page of [base, base+len): the check cubench_uffd
/// does after a run (0x5a per page for COPY/CONTINUE/WP/MOVE, 0 for ZEROPAGE).
uint64_t cubench_page_sum(const void *base, uint64_t len, uint64_t offset);

// MARK: - Heap compaction ---------------------------------------------------------------------

/// How the compactor fills to-space pages.
enum cubench_compact_mode {
    CUBENCH_COMPACT_COPY = 0,         ///< compact into a scratch page, UFFDIO_COPY (kernel allocates)
    CUBENCH_COMPACT_MOVE_FRESH = 1,   ///< compact into a fresh (unpopulated) pool page, UFFDIO_MOVE
    CUBENCH_COMPACT_MOVE_RECYCLED = 2,///< compact into a recycled (populated) pool page, UFFDIO_MOVE
};

struct cubench_compact_params {
    uint64_t to_pages;       ///< to-space pages (from-space is 2x, half the objects live)
    uint32_t mode;           ///< enum cubench_compact_mode
    uint32_t mutators;       ///< mutator threads reading random to-space objects (0..CUBENCH_MAX_THREADS)
    int32_t compactor_cpu;   ///< -1: unpinned
    int32_t mutator_cpu;     ///< mutator i on (mutator_cpu + i) % ncpus; -1: unpinned
    int32_t handler_cpu;     ///< the thread that compacts pages on mutator faults; -1: unpinned
    uint32_t timeout_ms;     ///< 0: 20000
    uint32_t batch_pages;    ///< compactor: consecutive pages per ioctl (0/1: one; max 512)
};

struct cubench_compact_result {
    uint64_t compactor_ns;   ///< compacting thread: start .. every to-space page filled
    uint64_t pages;          ///< to-space pages filled (by the compactor + by the fault handler)
    uint64_t handler_pages;  ///< pages the fault handler compacted for a waiting mutator
    uint64_t mutator_faults; ///< faults the handler read
    uint64_t mutator_reads;  ///< object reads by mutators while compaction ran
    uint64_t checksum;       ///< sum of the first word of every to-space object afterwards
    uint64_t expected;       ///< the same sum computed from the from-space (must equal checksum)
    uint64_t compactor_ioctls; ///< resolving ioctls the compacting thread issued
    uint64_t resolve_errors; ///< resolutions that failed (a zero page was mapped instead)
    int32_t first_error;     ///< errno of the first failed resolution, 0 if none
    uint32_t reserved;
    uint64_t tlb_shootdowns; ///< system-wide TLB shootdown IPIs during the compactor's section
                             ///< (/proc/interrupts "TLB", all CPUs; other load adds noise)
};

/// Live objects (64 B, ~50% live) are copied from a from-space into a to-space registered
/// MISSING, while mutators read to-space objects (faulting on pages not yet filled).
/// Returns -errno of the first failed resolution (EEXIST, EBUSY, ...) or -EILSEQ on a
/// checksum mismatch; `out` is filled either way.
int cubench_compaction(const struct cubench_compact_params *p, struct cubench_compact_result *out);

// MARK: - Lazy file load ------------------------------------------------------------------------

/// How the file is read.
enum cubench_load_mode {
    CUBENCH_LOAD_MMAP = 0,  ///< mmap(PROT_READ, MAP_PRIVATE) the file, read every page
    CUBENCH_LOAD_UFFD = 1,  ///< anon region, MISSING; per fault pread(window) into a buffer + UFFDIO_COPY
    CUBENCH_LOAD_PREAD = 2, ///< pread(window) into a buffer, no mapping (the I/O floor)
    CUBENCH_LOAD_MAPCOPY = 3, ///< anon region (NOHUGEPAGE), MISSING; per fault UFFDIO_COPY(window)
                              ///< straight from a mmap of the file: one copy (the `serve` path)
    CUBENCH_LOAD_INSTALL = 4, ///< anon region (THP-eligible), MISSING; cuffd_installer: pread into a
                              ///< huge-page donor + UFFDIO_MOVE, `fillers` prefetch threads
    CUBENCH_LOAD_MAPCOPY_POPULATED = 5, ///< MAPCOPY with the file's pages in the page cache mapped
                              ///< before the timing, as FileSource .mapped and `serve` do
                              ///< (cuffd_populate_resident); populate_ns, populated
    CUBENCH_LOAD_PREAD_FRESH = 6, ///< no uffd: per window MADV_POPULATE_WRITE of a fresh window of a
                                  ///< 2 MiB-aligned MADV_HUGEPAGE region, pread into it; `threads`
                                  ///< threads take windows from a shared counter (the physical
                                  ///< limit of a load into fresh memory)
};

struct cubench_load_params {
    const char *path;        ///< the file (created and filled by cubench_file_create)
    uint64_t bytes;          ///< bytes to load (<= file size)
    uint32_t mode;           ///< enum cubench_load_mode
    uint32_t drop_cache;     ///< 1: fsync + POSIX_FADV_DONTNEED before measuring (cold page cache)
    uint64_t window;         ///< readahead window for UFFD/PREAD (bytes, multiple of 4096)
    int32_t handler_cpu;
    int32_t fault_cpu;
    uint32_t timeout_ms;     ///< 0: 60000
    uint32_t threads;        ///< faulting threads (0: 1); thread i on CPU (fault_cpu + i) % ncpus
    uint32_t random;         ///< 1: the threads read whole windows in a shuffled order (shared)
    uint32_t fillers;        ///< INSTALL: prefetch threads, filler i on CPU (filler_cpu + i) % ncpus
    int32_t filler_cpu;
    uint32_t install_flags;  ///< INSTALL: enum cuffd_install_flags (CUFFD_INSTALL_COPY: no MOVE)
    uint64_t huge_bytes;     ///< out (INSTALL): bytes of the region mapped by huge pages afterwards
    uint64_t alloc_ns, fill_ns, place_ns; ///< out (INSTALL): the installer's time split (all threads)
    uint64_t populate_ns;    ///< out (MAPCOPY_POPULATED): populating the mapping (outside the timing)
    uint64_t populated;      ///< out (MAPCOPY_POPULATED): bytes populated (0 for a cold file)
    uint32_t fill_mapped;    ///< INSTALL: 1: the fill memcpys from a read-only mapping of the file
                             ///< instead of pread (measured slower: scripts/file-load-profile only)
    uint32_t no_prime;       ///< 1: skip cubench_prime_memory before the timed section
};

/// Creates (or truncates) `path` with `bytes` of deterministic data. 0 or -errno.
int cubench_file_create(const char *path, uint64_t bytes);

/// Loads the file as the mode says and reads every page. out->checksum is the sum of the first
/// 8 bytes of each page: equal across modes for the same file. Unless `no_prime`, the memory is
/// primed (cubench_prime_memory of the bytes) right before the timed section, whatever the mode.
int cubench_file_load(struct cubench_load_params *p, struct cubench_result *out);

/// System-wide TLB shootdown interrupts so far (x86 /proc/interrupts "TLB" row, summed over
/// CPUs); 0 when the row is not there.
uint64_t cubench_tlb_shootdowns(void);

/// The number of online CPUs.
int cubench_ncpus(void);

/// Primes the guest's free memory against free page reporting: MADV_POPULATE_WRITE of `bytes`
/// plus 64 MiB of 2 MiB-aligned MADV_HUGEPAGE memory, then munmap. Call right
/// before a timed section that allocates about `bytes`: the blocks it gets were just in use,
/// not handed back to the host. 0 or -errno (-ENOMEM: the memory is not there).
int cubench_prime_memory(uint64_t bytes);

#ifdef __cplusplus
}
#endif

#include "cubench_sigbus.h"

#endif // CUFFD_BENCH_H
