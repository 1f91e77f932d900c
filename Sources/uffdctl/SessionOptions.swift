import ArgumentParser
import Foundation
import UffdKit

/// The memory a session registers.
enum MemoryType: String, ExpressibleByArgument, CaseIterable, Sendable, Codable {
    case anon
    case shmem
    case shmemPrivate = "shmem-private"
    case hugetlb
    case hugetlbPrivate = "hugetlb-private"

    var kind: MappedRegion.Kind {
        switch self {
        case .anon: .anonymous(thpAligned: false)
        case .shmem: .shmem
        case .shmemPrivate: .shmemPrivate
        case .hugetlb: .hugetlb
        case .hugetlbPrivate: .hugetlbPrivate
        }
    }

    /// Whether huge pages back it (hugetlb, mapped shared or private).
    var isHugetlb: Bool { self == .hugetlb || self == .hugetlbPrivate }

    /// The page size of this memory (the huge page size for hugetlb).
    var pageSize: Int { isHugetlb ? (UffdKit.hugePageSize ?? 2 << 20) : basePageSize }
}

/// The order in which workers touch their pages.
enum AccessOrder: String, ExpressibleByArgument, CaseIterable, Sendable, Codable {
    case seq
    case random
}

/// Options every session subcommand takes.
struct SessionOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Region size, with K/M/G suffixes (default 64M; must be a multiple of the page size).",
                               valueName: "size"))
    var size: String?

    @Option(name: .customLong("memory"),
            help: ArgumentHelp("Memory type: anon, shmem, shmem-private, hugetlb or hugetlb-private (default anon; continue: shmem).",
                               valueName: "memory"))
    var memoryChoice: MemoryType?

    /// The memory type, anon unless --memory says otherwise.
    var memory: MemoryType { memoryChoice ?? .anon }

    @Option(help: "Faulting worker threads (1...256, at most one per page).")
    var threads: Int = 2

    @Option(help: "Access order of each worker over its share of the pages: seq or random.")
    var access: AccessOrder = .seq

    @Flag(help: "Workers write (a marker word per page, verified) instead of reading.")
    var write = false

    @Option(help: "Handler reader threads.")
    var readers: Int = 1

    @Option(help: ArgumentHelp("Pin the workers and the handler's readers to this CPU (same-CPU wakeups are much cheaper on VMs).",
                               valueName: "cpu"))
    var pin: Int32?

    @Option(help: "Watchdog: give up (exit 1) when the workload has not finished after this many seconds.")
    var timeout: Double = 120

    @Flag(help: "Print one JSON object on stdout instead of the human summary.")
    var json = false

    @Flag(help: "No progress bar on stderr.")
    var quiet = false

    /// The default region size when --size is not given.
    static let defaultSize = 64 << 20

    /// Checks the thread/reader/timeout numbers that do not depend on the region.
    func validateCommon() throws(CLIError) {
        guard threads >= 1 else { throw .usage("--threads must be at least 1 (got \(threads))") }
        guard threads <= SessionOptions.maxThreads else {
            throw .usage("--threads \(threads) is more than is sensible (at most \(SessionOptions.maxThreads))")
        }
        guard readers >= 1, readers <= 64 else { throw .usage("--readers must be 1...64 (got \(readers))") }
        guard timeout > 0, timeout.isFinite else { throw .usage("--timeout must be a positive number of seconds") }
        if let pin {
            let cpus = Int32(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
            guard pin >= 0, pin < cpus else { throw .usage("--pin \(pin): this machine has CPUs 0...\(cpus - 1)") }
        }
    }

    static let maxThreads = 256

    /// The region size: --size (or `fallback`), checked for alignment to `pageSize`, for the
    /// machine's memory, and for at least one page per thread.
    func regionSize(pageSize: Int, fallback: Int = SessionOptions.defaultSize, copies: Int = 1,
                    memory: MemoryType? = nil) throws(CLIError) -> Int {
        let bytes = try size.map { s throws(CLIError) in try parseSize(s, option: "--size") } ?? fallback
        try checkRegionSize(bytes, pageSize: pageSize, copies: copies, memory: memory)
        return bytes
    }

    /// Alignment, memory and thread-count checks for a region of `bytes`.
    func checkRegionSize(_ bytes: Int, pageSize: Int, copies: Int = 1, memory: MemoryType? = nil) throws(CLIError) {
        guard bytes % pageSize == 0 else {
            throw .usage("--size \(bytes) bytes is not a multiple of the \((memory ?? self.memory).rawValue) page size (\(pageSize) bytes)")
        }
        let phys = physicalMemory()
        let (need, overflow) = bytes.multipliedReportingOverflow(by: copies)
        if overflow || need > phys {
            throw .usage("--size \(formatBytes(bytes)) is more than this machine can map and touch "
                + "(\(formatBytes(phys)) of memory\(copies > 1 ? ", \(copies) copies needed" : ""))")
        }
        let pages = bytes / basePageSize
        guard threads <= pages else {
            throw .usage("--threads \(threads) is more than the \(pages) pages of the region (one page per thread at least)")
        }
    }

    /// Exit 3 with the sysctl fix when hugetlb memory of `bytes` cannot be backed.
    func checkHugePages(_ bytes: Int, regions: Int = 1, memory: MemoryType? = nil) throws(CLIError) {
        guard (memory ?? self.memory).isHugetlb else { return }
        guard let hp = UffdKit.hugePageSize else {
            throw .notAllowed("this kernel reports no huge page size (hugetlb unavailable)",
                              fix: "use --memory anon or shmem, or a kernel with CONFIG_HUGETLBFS")
        }
        let needed = regions * bytes / hp
        let free = meminfoValue("HugePages_Free") ?? 0
        let total = meminfoValue("HugePages_Total") ?? 0
        if free < needed {
            throw .notAllowed("hugetlb: \(needed) huge pages of \(hp >> 10) KiB needed, \(free) free",
                              fix: "reserve huge pages as root: echo \(total - free + needed) > /proc/sys/vm/nr_hugepages")
        }
    }
}
