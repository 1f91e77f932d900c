import CUffdNet
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Packed snapshots: a memory image as independently compressed zstd frames (one per chunk,
/// 2 MiB by default, each with a content checksum) plus an index, in one file — one object in a
/// store. All-zero chunks are not stored (served with ZEROPAGE). Layout: a 4 KiB header
/// (`UFFDPAK1`, version, chunk size, raw length, index position, FNV-1a hashes of header and
/// index), the frames, the index (offset, length, kind per chunk). The index maps chunks to
/// frames, so frames may be stored in any order (a working-set-first order is a valid file).
/// Open one with ``PageSources/open(_:options:)`` or ``ChunkedSource``.
public enum PackedSnapshot {
    /// What packing did.
    public struct PackStats: Sendable {
        /// Bytes of the raw image.
        public var rawLength: Int
        /// Bytes of the packed file.
        public var packedLength: Int
        /// Chunks in the image.
        public var chunks: Int
        /// Chunks not stored because they are all zeros.
        public var zeroChunks: Int
        /// Compressed bytes of the stored frames.
        public var storedBytes: Int
        /// Raw bytes per packed byte.
        public var ratio: Double { packedLength > 0 ? Double(rawLength) / Double(packedLength) : 0 }
        /// Chunks stored first (``pack(_:to:chunkSize:level:firstChunks:)``), and where their
        /// frames end: one read of `[4096, firstEnd)` brings them all.
        public var firstChunks = 0, firstEnd = 0
    }

    /// Packs the file `input` into `output` (`cunet_pack_file_ordered`). The frames of
    /// `firstChunks` (chunk indexes, e.g. a working set's chunks in recorded order) are stored
    /// first and contiguously; the rest follow in chunk order.
    public static func pack(_ input: String, to output: String, chunkSize: Int = 2 << 20, level: Int = 3,
                            firstChunks: [Int] = []) throws(UffdError) -> PackStats {
        var s = cunet_pack_stats()
        let first = firstChunks.map { UInt64(clamping: $0) }
        let (rc, reason) = first.withUnsafeBufferPointer { f in
            withErrorBuffer { cunet_pack_file_ordered(input, output, UInt32(clamping: chunkSize), Int32(level), f.baseAddress, f.count, &s, $0, $1) }
        }
        if rc < 0 { throw UffdError(.source, rc: rc, detail: reason) }
        var out = PackStats(rawLength: Int(s.raw_length), packedLength: Int(s.packed_length), chunks: Int(s.chunks),
                            zeroChunks: Int(s.zero_chunks), storedBytes: Int(s.stored_bytes))
        out.firstChunks = Int(s.first_chunks)
        out.firstEnd = Int(s.first_end)
        return out
    }

    /// The layout of a packed snapshot.
    public struct Info: Sendable {
        /// Where it was read from.
        public var location: String
        /// Bytes per chunk.
        public var chunkSize: Int
        /// Bytes of the raw image.
        public var rawLength: Int
        /// Chunks, stored (zstd frames) and zero.
        public var chunks: Int, storedChunks: Int, zeroChunks: Int
        /// Compressed bytes of the frames, and of the whole packed file.
        public var storedBytes: Int, packedLength: Int
        /// Largest frame (compressed bytes).
        public var largestFrame: Int
        /// ETag pinned at open (remote only).
        public var etag: String
        /// Raw bytes per packed byte.
        public var ratio: Double { packedLength > 0 ? Double(rawLength) / Double(packedLength) : 0 }
    }

    /// Reads the header and index of the packed snapshot `spec` names (a path or URL).
    public static func info(_ spec: String, options: RemoteOptions = RemoteOptions()) throws(UffdError) -> Info {
        let source = try openPacked(spec, options: options)
        let header = cunet_source_header(source.handle)!.pointee
        let index = UnsafeBufferPointer(start: cunet_source_index(source.handle), count: Int(header.chunk_count))
        var info = Info(location: spec, chunkSize: Int(header.chunk_size), rawLength: Int(header.raw_length),
                        chunks: index.count, storedChunks: 0, zeroChunks: 0, storedBytes: 0,
                        packedLength: Int(header.index_offset + header.index_length), largestFrame: 0, etag: source.etag)
        for e in index {
            if e.kind == CUNET_CHUNK_ZERO { info.zeroChunks += 1; continue }
            info.storedChunks += 1
            info.storedBytes += Int(e.length)
            info.largestFrame = max(info.largestFrame, Int(e.length))
        }
        return info
    }

    /// Writes the raw image of the packed snapshot `spec` to `output`, byte for byte (zero
    /// chunks as holes). Returns the bytes written.
    @discardableResult
    public static func unpack(_ spec: String, to output: String, options: RemoteOptions = RemoteOptions()) throws(UffdError) -> Int {
        let source = try openPacked(spec, options: options)
        let fd = Glibc.open(output, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw UffdError(.source, Errno(rawValue: errno), detail: "cannot write \(output)") }
        var ok = false
        defer {
            close(fd)
            if !ok { unlink(output) }
        }
        guard ftruncate(fd, off_t(source.length)) == 0 else {
            throw UffdError(.source, Errno(rawValue: errno), detail: "cannot size \(output)")
        }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: source.chunkSize, alignment: 4096)
        defer { buffer.deallocate() }
        var offset = 0
        while offset < source.length {
            let n = min(source.chunkSize, source.length - offset)
            if !source.isZero(at: offset, count: n) {
                _ = try source.bytesTyped(at: offset, count: n, scratch: buffer)
                var done = 0
                while done < n {
                    let w = pwrite(fd, buffer + done, n - done, off_t(offset + done))
                    if w < 0 && errno == EINTR { continue }
                    guard w > 0 else { throw UffdError(.source, Errno(rawValue: errno), detail: "writing \(output)") }
                    done += w
                }
            }
            offset += n
        }
        ok = true
        return source.length
    }

    static func openPacked(_ spec: String, options: RemoteOptions) throws(UffdError) -> ChunkedSource {
        let opened = try PageSources.open(spec, options: options)
        guard let source = opened as? ChunkedSource, source.isPacked else {
            throw UffdError(.argument, .invalidArgument, detail: "\(spec) is not a packed snapshot (no UFFDPAK1 magic): pack it with `uffdctl snapshot pack`")
        }
        return source
    }
}

extension ChunkedSource {
    /// ``bytes(at:count:scratch:)`` with the typed error.
    func bytesTyped(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer) throws(UffdError) -> UnsafeRawPointer {
        let (rc, reason) = withErrorBuffer { cunet_source_read(handle, UInt64(offset), count, scratch, $0, $1) }
        if rc < 0 { throw UffdError(.source, rc: rc, detail: reason) }
        return UnsafeRawPointer(scratch)
    }
}
