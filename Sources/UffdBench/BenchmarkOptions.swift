// What a benchmark run measures and how often.

/// Options of one benchmark run (`uffdctl bench`, `make bench`).
public struct BenchmarkOptions: Sendable {
    /// Full run: 4x the pages, 1 GiB files. Quick (false) is the default.
    public var full: Bool
    /// Measured runs per case (at least 5 are used; min and median are reported).
    public var repeats: Int
    /// 4 KiB pages per run for the one-fault-per-page cases (nil: 4096 quick, 16384 full).
    public var pages: Int?
    /// 4 KiB pages per run for the bulk (window) cases (nil: 16384 quick, 65536 full).
    public var bulkPages: Int?
    /// To-space pages of the heap-compaction workload (nil: 8192 quick, 32768 full).
    public var compactionPages: Int?
    /// Bytes of each lazily loaded file (nil: 256 MiB quick, 1 GiB full).
    public var fileBytes: UInt64?
    /// Directories the lazy-load file is created in (tmpfs and disk by default).
    public var fileDirectories: [String]
    /// One untimed run of each case before the measured ones.
    public var warmup: Bool
    /// Keep only cases whose name contains one of these (empty: all). Baselines of kept
    /// cases are kept too, so every ratio has its denominator.
    public var filter: [String]
    /// The caller wants JSON (the report holds both renderings either way).
    public var json: Bool
    /// CPU of the handler and of the faulting thread in the pinned same-CPU cases; the
    /// cross-CPU cases put the handler on `(faultCPU + 1) % ncpus`.
    public var faultCPU: Int32
    /// See `faultCPU`.
    public var handlerCPU: Int32
    /// Prime free memory right before the timed section of the file rows, the UffdKit file rows
    /// and the 2 MiB bulk rows (cubench_prime_memory: free page reporting hands idle free memory
    /// back to the host, and its next use then costs host faults). Off only to see that effect.
    public var prime: Bool = true

    /// Creates options; `nil` sizes follow `full`.
    public init(full: Bool = false, repeats: Int = 5, pages: Int? = nil, bulkPages: Int? = nil,
                compactionPages: Int? = nil, fileBytes: UInt64? = nil,
                fileDirectories: [String] = ["/dev/shm", "/var/tmp"], warmup: Bool = true,
                filter: [String] = [], json: Bool = false, faultCPU: Int32 = 0, handlerCPU: Int32 = 0) {
        self.full = full
        self.repeats = repeats
        self.pages = pages
        self.bulkPages = bulkPages
        self.compactionPages = compactionPages
        self.fileBytes = fileBytes
        self.fileDirectories = fileDirectories
        self.warmup = warmup
        self.filter = filter
        self.json = json
        self.faultCPU = faultCPU
        self.handlerCPU = handlerCPU
    }

    /// Runs per case actually measured (never fewer than 5).
    public var effectiveRepeats: Int { max(repeats, 5) }
    /// Pages of the one-fault-per-page cases.
    public var effectivePages: Int { max(pages ?? (full ? 16384 : 4096), 64) }
    /// Pages of the bulk cases (a multiple of 512: whole 2 MiB windows).
    public var effectiveBulkPages: Int { max(((bulkPages ?? (full ? 65536 : 16384)) + 511) / 512 * 512, 512) }
    /// To-space pages of the compaction workload.
    public var effectiveCompactionPages: Int { max(compactionPages ?? (full ? 32768 : 8192), 64) }
    /// Bytes of the lazily loaded file (whole 4 KiB pages).
    public var effectiveFileBytes: UInt64 { max((fileBytes ?? (full ? 1 << 30 : 256 << 20)) & ~4095, 1 << 20) }
}
