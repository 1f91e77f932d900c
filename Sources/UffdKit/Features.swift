import CUffd

/// userfaultfd API features (`UFFD_FEATURE_*`), as requested at open and granted by the kernel.
public struct Features: OptionSet, Sendable, Hashable, CustomStringConvertible {
    /// The raw `UFFD_FEATURE_*` bits.
    public let rawValue: UInt64
    /// Wraps raw `UFFD_FEATURE_*` bits (unknown bits from a newer kernel are kept).
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Write-protect faults are reported (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`).
    public static let pagefaultFlagWP = Features(rawValue: UInt64(UFFD_FEATURE_PAGEFAULT_FLAG_WP))
    /// fork() hands the child's userfaultfd to the handler (`EVENT_FORK`).
    public static let eventFork = Features(rawValue: UInt64(UFFD_FEATURE_EVENT_FORK))
    /// mremap() of registered memory is reported (`EVENT_REMAP`).
    public static let eventRemap = Features(rawValue: UInt64(UFFD_FEATURE_EVENT_REMAP))
    /// MADV_DONTNEED/MADV_REMOVE of registered memory is reported (`EVENT_REMOVE`).
    public static let eventRemove = Features(rawValue: UInt64(UFFD_FEATURE_EVENT_REMOVE))
    /// MISSING faults on hugetlbfs (`MISSING_HUGETLBFS`).
    public static let missingHugetlbfs = Features(rawValue: UInt64(UFFD_FEATURE_MISSING_HUGETLBFS))
    /// MISSING faults on shmem (`MISSING_SHMEM`).
    public static let missingShmem = Features(rawValue: UInt64(UFFD_FEATURE_MISSING_SHMEM))
    /// munmap() of registered memory is reported (`EVENT_UNMAP`).
    public static let eventUnmap = Features(rawValue: UInt64(UFFD_FEATURE_EVENT_UNMAP))
    /// Faults raise SIGBUS instead of being queued (`SIGBUS`).
    public static let sigbus = Features(rawValue: UInt64(UFFD_FEATURE_SIGBUS))
    /// Faults carry the faulting thread's id (`THREAD_ID`).
    public static let threadID = Features(rawValue: UInt64(UFFD_FEATURE_THREAD_ID))
    /// MINOR faults on hugetlbfs (`MINOR_HUGETLBFS`).
    public static let minorHugetlbfs = Features(rawValue: UInt64(UFFD_FEATURE_MINOR_HUGETLBFS))
    /// MINOR faults on shmem (`MINOR_SHMEM`).
    public static let minorShmem = Features(rawValue: UInt64(UFFD_FEATURE_MINOR_SHMEM))
    /// Fault addresses are exact, not page-aligned (`EXACT_ADDRESS`).
    public static let exactAddress = Features(rawValue: UInt64(UFFD_FEATURE_EXACT_ADDRESS))
    /// Write-protect on hugetlbfs and shmem (`WP_HUGETLBFS_SHMEM`).
    public static let wpHugetlbfsShmem = Features(rawValue: UInt64(UFFD_FEATURE_WP_HUGETLBFS_SHMEM))
    /// Write-protect also applies to unpopulated pages (`WP_UNPOPULATED`).
    public static let wpUnpopulated = Features(rawValue: UInt64(UFFD_FEATURE_WP_UNPOPULATED))
    /// UFFDIO_POISON (`POISON`).
    public static let poison = Features(rawValue: UInt64(UFFD_FEATURE_POISON))
    /// Write-protect faults are resolved by the kernel; read dirty pages with PAGEMAP_SCAN (`WP_ASYNC`).
    public static let wpAsync = Features(rawValue: UInt64(UFFD_FEATURE_WP_ASYNC))
    /// UFFDIO_MOVE (`MOVE`).
    public static let move = Features(rawValue: UInt64(UFFD_FEATURE_MOVE))

    /// Every event feature (fork, remap, remove, unmap).
    public static let allEvents: Features = [.eventFork, .eventRemap, .eventRemove, .eventUnmap]

    /// The kernel names of the set bits, e.g. `[EVENT_FORK, MOVE]`; unknown bits as `bit N`.
    public var names: [String] {
        (0..<64).compactMap { bit -> String? in
            guard rawValue & (1 << UInt64(bit)) != 0 else { return nil }
            if let n = cuffd_feature_name(UInt32(bit)) { return String(cString: n) }
            return "bit \(bit)"
        }
    }

    /// The set bits' names in brackets.
    public var description: String { "[" + names.joined(separator: ", ") + "]" }
}

/// Registration modes (`UFFDIO_REGISTER_MODE_*`).
public struct RegisterMode: OptionSet, Sendable, Hashable, CustomStringConvertible {
    /// The raw `UFFDIO_REGISTER_MODE_*` bits.
    public let rawValue: UInt64
    /// Wraps raw mode bits.
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Faults on pages that are not populated.
    public static let missing = RegisterMode(rawValue: UInt64(UFFDIO_REGISTER_MODE_MISSING))
    /// Write faults on write-protected pages.
    public static let writeProtect = RegisterMode(rawValue: UInt64(UFFDIO_REGISTER_MODE_WP))
    /// Faults on pages present in the page cache but not mapped (shmem/hugetlb).
    public static let minor = RegisterMode(rawValue: UInt64(UFFDIO_REGISTER_MODE_MINOR))

    /// `missing`, `writeProtect`, `minor` joined by `|`.
    public var description: String {
        var parts: [String] = []
        if contains(.missing) { parts.append("missing") }
        if contains(.writeProtect) { parts.append("writeProtect") }
        if contains(.minor) { parts.append("minor") }
        let rest = rawValue & ~RegisterMode([.missing, .writeProtect, .minor]).rawValue
        if rest != 0 { parts.append("0x" + String(rest, radix: 16)) }
        return parts.isEmpty ? "[]" : parts.joined(separator: "|")
    }
}

/// The ioctls available on an fd (after UFFDIO_API) or on a registered range: bit `1 << _UFFDIO_*`.
public struct Ioctls: OptionSet, Sendable, Hashable, CustomStringConvertible {
    /// The raw mask.
    public let rawValue: UInt64
    /// Wraps a raw ioctl mask.
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// UFFDIO_REGISTER.
    public static let register = Ioctls(rawValue: 1 << UInt64(_UFFDIO_REGISTER))
    /// UFFDIO_UNREGISTER.
    public static let unregister = Ioctls(rawValue: 1 << UInt64(_UFFDIO_UNREGISTER))
    /// UFFDIO_WAKE.
    public static let wake = Ioctls(rawValue: 1 << UInt64(_UFFDIO_WAKE))
    /// UFFDIO_COPY.
    public static let copy = Ioctls(rawValue: 1 << UInt64(_UFFDIO_COPY))
    /// UFFDIO_ZEROPAGE.
    public static let zeropage = Ioctls(rawValue: 1 << UInt64(_UFFDIO_ZEROPAGE))
    /// UFFDIO_MOVE.
    public static let move = Ioctls(rawValue: 1 << UInt64(_UFFDIO_MOVE))
    /// UFFDIO_WRITEPROTECT.
    public static let writeProtect = Ioctls(rawValue: 1 << UInt64(_UFFDIO_WRITEPROTECT))
    /// UFFDIO_CONTINUE.
    public static let `continue` = Ioctls(rawValue: 1 << UInt64(_UFFDIO_CONTINUE))
    /// UFFDIO_POISON.
    public static let poison = Ioctls(rawValue: 1 << UInt64(_UFFDIO_POISON))
    /// UFFDIO_API.
    public static let api = Ioctls(rawValue: 1 << UInt64(_UFFDIO_API))

    /// The ioctl names of the set bits, e.g. `[COPY, ZEROPAGE, WAKE]`.
    public var names: [String] {
        (0..<64).compactMap { bit -> String? in
            guard rawValue & (1 << UInt64(bit)) != 0 else { return nil }
            if let n = cuffd_ioctl_name(UInt32(bit)) { return String(cString: n) }
            return "ioctl \(bit)"
        }
    }

    /// The set ioctls' names in brackets.
    public var description: String { "[" + names.joined(separator: ", ") + "]" }
}
