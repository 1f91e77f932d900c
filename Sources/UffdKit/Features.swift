import CUffd

/// userfaultfd API features (`UFFD_FEATURE_*`), as requested at open and granted by the kernel.
public struct Features: OptionSet, Sendable, Hashable, CustomStringConvertible {
    /// The raw `UFFD_FEATURE_*` bits.
    public let rawValue: UInt64
    /// Wraps raw `UFFD_FEATURE_*` bits (unknown bits from a newer kernel are kept).
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Write-protect faults are reported (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`).
    public static let pagefaultFlagWP = Features(rawValue: 1 << 0)
    /// fork() hands the child's userfaultfd to the handler (`EVENT_FORK`).
    public static let eventFork = Features(rawValue: 1 << 1)
    /// mremap() of registered memory is reported (`EVENT_REMAP`).
    public static let eventRemap = Features(rawValue: 1 << 2)
    /// MADV_DONTNEED/MADV_REMOVE of registered memory is reported (`EVENT_REMOVE`).
    public static let eventRemove = Features(rawValue: 1 << 3)
    /// MISSING faults on hugetlbfs (`MISSING_HUGETLBFS`).
    public static let missingHugetlbfs = Features(rawValue: 1 << 4)
    /// MISSING faults on shmem (`MISSING_SHMEM`).
    public static let missingShmem = Features(rawValue: 1 << 5)
    /// munmap() of registered memory is reported (`EVENT_UNMAP`).
    public static let eventUnmap = Features(rawValue: 1 << 6)
    /// Faults raise SIGBUS instead of being queued (`SIGBUS`).
    public static let sigbus = Features(rawValue: 1 << 7)
    /// Faults carry the faulting thread's id (`THREAD_ID`).
    public static let threadID = Features(rawValue: 1 << 8)
    /// MINOR faults on hugetlbfs (`MINOR_HUGETLBFS`).
    public static let minorHugetlbfs = Features(rawValue: 1 << 9)
    /// MINOR faults on shmem (`MINOR_SHMEM`).
    public static let minorShmem = Features(rawValue: 1 << 10)
    /// Fault addresses are exact, not page-aligned (`EXACT_ADDRESS`).
    public static let exactAddress = Features(rawValue: 1 << 11)
    /// Write-protect on hugetlbfs and shmem (`WP_HUGETLBFS_SHMEM`).
    public static let wpHugetlbfsShmem = Features(rawValue: 1 << 12)
    /// Write-protect also applies to unpopulated pages (`WP_UNPOPULATED`).
    public static let wpUnpopulated = Features(rawValue: 1 << 13)
    /// UFFDIO_POISON (`POISON`).
    public static let poison = Features(rawValue: 1 << 14)
    /// Write-protect faults are resolved by the kernel; read dirty pages with PAGEMAP_SCAN (`WP_ASYNC`).
    public static let wpAsync = Features(rawValue: 1 << 15)
    /// UFFDIO_MOVE (`MOVE`).
    public static let move = Features(rawValue: 1 << 16)

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
    public static let missing = RegisterMode(rawValue: 1 << 0)
    /// Write faults on write-protected pages.
    public static let writeProtect = RegisterMode(rawValue: 1 << 1)
    /// Faults on pages present in the page cache but not mapped (shmem/hugetlb).
    public static let minor = RegisterMode(rawValue: 1 << 2)

    /// `missing`, `writeProtect`, `minor` joined by `|`.
    public var description: String {
        var parts: [String] = []
        if contains(.missing) { parts.append("missing") }
        if contains(.writeProtect) { parts.append("writeProtect") }
        if contains(.minor) { parts.append("minor") }
        let rest = rawValue & ~0x7
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
    public static let register = Ioctls(rawValue: 1 << 0x00)
    /// UFFDIO_UNREGISTER.
    public static let unregister = Ioctls(rawValue: 1 << 0x01)
    /// UFFDIO_WAKE.
    public static let wake = Ioctls(rawValue: 1 << 0x02)
    /// UFFDIO_COPY.
    public static let copy = Ioctls(rawValue: 1 << 0x03)
    /// UFFDIO_ZEROPAGE.
    public static let zeropage = Ioctls(rawValue: 1 << 0x04)
    /// UFFDIO_MOVE.
    public static let move = Ioctls(rawValue: 1 << 0x05)
    /// UFFDIO_WRITEPROTECT.
    public static let writeProtect = Ioctls(rawValue: 1 << 0x06)
    /// UFFDIO_CONTINUE.
    public static let `continue` = Ioctls(rawValue: 1 << 0x07)
    /// UFFDIO_POISON.
    public static let poison = Ioctls(rawValue: 1 << 0x08)
    /// UFFDIO_API.
    public static let api = Ioctls(rawValue: 1 << 0x3F)

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
