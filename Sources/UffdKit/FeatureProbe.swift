import CUffd

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What the running kernel offers, asked the way a program would ask it: `UFFDIO_API` on a
/// throwaway fd for the features and the fd's ioctls, and `UFFDIO_REGISTER` of a small probe
/// region for the ioctls a registered range of one memory type offers. Every answer comes from
/// the kernel at run time; the headers this was built with decide nothing.
public struct FeatureProbe: Sendable {
    /// The `UFFD_API` number of the handshake.
    public static let apiVersion = Int(UFFD_API)

    /// The features the kernel offers (unknown, newer bits kept).
    public let features: Features
    /// The ioctls available on an fd after the handshake (`uffdio_api.ioctls`).
    public let ioctls: Ioctls

    /// Probes the kernel (`UFFDIO_API` on a throwaway fd, then on a user-mode-only fd for its ioctls).
    /// - Throws: ``UffdError`` `.open` when this user may not open a userfaultfd, `.api` when the
    ///   handshake fails.
    public init() throws(UffdError) {
        features = try Userfaultfd.probe()
        ioctls = try Userfaultfd(features: []).ioctls
    }

    /// The registration modes a memory kind can take: MISSING and WP everywhere, MINOR where
    /// there is a page cache (shmem, hugetlb).
    public static func modes(for kind: MappedRegion.Kind) -> RegisterMode {
        switch kind {
        case .anonymous: [.missing, .writeProtect]
        case .shmem, .shmemPrivate, .hugetlb, .hugetlbPrivate: [.missing, .writeProtect, .minor]
        }
    }

    /// The features a probe registration asks for: every offered one except the events (with
    /// EVENT_UNMAP the probe's own munmap would wait for a reader that does not exist), SIGBUS
    /// (no messages) and WP_ASYNC (it changes what WP registration means).
    var rangeFeatures: Features {
        features.subtracting(Features.allEvents.union([.sigbus, .wpAsync]))
    }

    /// The ioctls a range of `kind` offers when registered for `modes` (``modes(for:)`` when nil):
    /// maps one page of that kind, registers it on a fresh fd, and unmaps it.
    /// - Throws: ``UffdError`` `.map` when the memory cannot be mapped (hugetlb without free
    ///   huge pages: ENOMEM), `.register` when the kernel refuses the modes for that memory
    ///   (EINVAL), `.open`/`.api` as ``init()``.
    public func rangeIoctls(_ kind: MappedRegion.Kind, modes: RegisterMode? = nil) throws(UffdError) -> Ioctls {
        let length = kind.isHugetlb ? (hugePageSize ?? 2 << 20) : basePageSize
        let region = try MappedRegion(kind, length: length)
        let uffd = try Userfaultfd(features: rangeFeatures)
        defer { withExtendedLifetime(region) { uffd.close() } }
        return try uffd.register(region.address, length: region.length, modes: modes ?? Self.modes(for: kind))
    }
}

extension Features {
    /// Every feature bit this build can name (`UFFD_FEATURE_*` up to the newest in `cuffd_compat.h`).
    public static var known: Features {
        Features(rawValue: (0..<64).reduce(UInt64(0)) { m, bit in
            cuffd_feature_name(UInt32(bit)) == nil ? m : m | (1 << UInt64(bit))
        })
    }

    /// The set bit positions, lowest first.
    public var bits: [Int] { (0..<64).filter { rawValue & (1 << UInt64($0)) != 0 } }
}
