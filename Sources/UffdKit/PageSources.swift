import CUffdNet
import SystemPackage
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A page source that knows, without reading, which ranges are all zeros (a packed snapshot's
/// zero chunks): ``CopyPolicy`` resolves those with UFFDIO_ZEROPAGE (a COPY of zeros on
/// hugetlb) instead of copying bytes.
public protocol ZeroAwarePageSource: PageSource {
    /// True when every byte of `[offset, offset+count)` is zero (or past the end). Must not block.
    func isZero(at offset: Int, count: Int) -> Bool
}

/// Opening a page source from its name, the way every command and the library name sources.
public enum PageSources {
    /// Opens what `spec` names:
    /// - `http://…` / `https://…`: a raw image or a packed snapshot behind a URL (range requests);
    /// - `s3://BUCKET/KEY`: the same from an S3 API store, signed with SigV4 from `AWS_*`
    ///   variables (`options.endpoint` for S3-compatible stores, path-style);
    /// - `file:PATH` or a plain path: a packed snapshot (by its magic) or a raw file
    ///   (``FileSource``, read with pread).
    ///
    /// Remote objects are opened with a HEAD request (size and ETag pinned); 403, 404, DNS,
    /// refused connections and timeouts throw one ``UffdError`` `.source` whose detail says what to do.
    public static func open(_ spec: String, options: RemoteOptions = RemoteOptions()) throws(UffdError) -> any PageSource {
        if spec.hasPrefix("http://") || spec.hasPrefix("https://") || spec.hasPrefix("s3://") {
            return try ChunkedSource(url: spec, options: options)
        }
        if spec.contains("://") {
            throw UffdError(.argument, .invalidArgument, detail: "\(spec): use a path, http://, https:// or s3://BUCKET/KEY")
        }
        let path = spec.hasPrefix("file:") ? String(spec.dropFirst(5)) : spec
        guard !path.isEmpty else { throw UffdError(.argument, .invalidArgument, detail: "empty source path") }
        if try isPackedFile(path) { return try ChunkedSource(packedPath: path, options: options) }
        return try FileSource(path: path)
    }

    /// Like ``open(_:options:)``, but every caller naming the same `spec` while an earlier
    /// instance is alive gets that instance: one chunk cache for all VMs a server restores from
    /// the same image.
    public static func shared(_ spec: String, options: RemoteOptions = RemoteOptions()) throws(UffdError) -> any PageSource {
        if let existing = registry.withLock({ $0[spec]?.source }) { return existing }
        let opened = try open(spec, options: options)
        return registry.withLock { table in
            if let raced = table[spec]?.source { return raced }
            table = table.filter { $0.value.source != nil }
            table[spec] = WeakSource(opened)
            return opened
        }
    }

    /// Whether the file at `path` starts with the packed snapshot magic.
    public static func isPackedFile(_ path: String) throws(UffdError) -> Bool {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw UffdError(.source, Errno(rawValue: errno), detail: "open \(path)") }
        defer { close(fd) }
        var magic = (UInt64(0))
        let n = pread(fd, &magic, 8, 0)
        return n == 8 && withUnsafeBytes(of: &magic) { cunet_is_packed($0.baseAddress, 8) != 0 }
    }

    /// FNV-1a 64 of some bytes (fingerprints an image: `uffdctl copy` reports the restored
    /// region's, tests compare it with the original file's).
    public static func fingerprint(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
        cunet_fnv1a(CUNET_FNV_SEED, bytes.baseAddress, bytes.count)
    }

    private final class WeakSource: @unchecked Sendable {
        weak var object: AnyObject?
        let value: (any PageSource)?
        init(_ s: any PageSource) {
            // Class sources are held weakly (the registry never keeps an image alive); value
            // sources are cheap and kept.
            if type(of: s) is AnyClass { object = s as AnyObject; value = nil } else { value = s }
        }
        var source: (any PageSource)? { value ?? (object as? any PageSource) }
    }

    private static let registry = Mutex<[String: WeakSource]>([:])
}
