import CUffdNet

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// How remote objects are reached: S3 endpoint and region, connections, timeouts, retries,
/// and the chunk cache. The defaults suit a restore over a LAN or from a cloud object store.
public struct RemoteOptions: Sendable {
    /// An S3-compatible endpoint (`http://127.0.0.1:9000`, Ceph RGW, MinIO, GCS's
    /// `https://storage.googleapis.com`); requests then use path-style addressing. nil: AWS S3.
    public var endpoint: String?
    /// The SigV4 region; nil: `AWS_REGION`, then `AWS_DEFAULT_REGION`, then `us-east-1`.
    public var region: String?
    /// Parallel connections (range requests in flight) per source.
    public var maxConnections = 8
    /// Bytes of decompressed chunks kept in memory per source.
    public var cacheBytes = 256 << 20
    /// Bytes per fetch of a raw (unpacked) remote image: 2 MiB suits sequential restores;
    /// random small faults over a high-latency link want less (e.g. 64 KiB). A packed
    /// snapshot's chunk size is the one it was packed with.
    public var rawChunkSize = 2 << 20
    /// Chunks fetched ahead of a sequential miss (0: none).
    public var readaheadChunks = 4
    /// Seconds per connection attempt.
    public var connectTimeout = 5.0
    /// Seconds per request, body included: a slower request counts as timed out (and is retried).
    public var requestTimeout = 30.0
    /// Extra attempts for 5xx, timeouts and dropped connections.
    public var retries = 3
    /// Seconds before the first retry, doubled for each further one.
    public var backoff = 0.05
    /// Seconds a chunk whose fetch failed (after the retries) fails at once, with the same
    /// reason, before it is fetched again: a dead server costs each fault microseconds, not
    /// the whole retry budget.
    public var failedChunkHold = 1.0

    /// The defaults.
    public init() {}
}

/// A page source read in chunks through a bounded cache of decompressed chunks: a raw image
/// behind an `http(s)://` or `s3://` URL (HTTP range requests, SigV4 for S3), or a packed
/// snapshot (see ``PackedSnapshot``) in a local file or behind a URL (one range request per
/// frame). Readers of a chunk being fetched wait for that one fetch (single flight); sequential
/// misses fetch the next chunks ahead; the object's ETag is pinned so a replaced object is an
/// error, never a mix of two versions. One instance may serve many handlers and VMs at once.
///
/// Fetch failures (after the retries) and corrupt frames throw ``UffdError`` `.source` whose
/// detail names the URL, frame or HTTP status: the handler's fallback then unblocks the
/// faulting thread and the failure reaches the owner.
public final class ChunkedSource: PageSource, ZeroAwarePageSource, @unchecked Sendable {
    let handle: OpaquePointer
    /// The image size in bytes (the unpacked size for a packed snapshot).
    public let length: Int
    /// Bytes per chunk (the unit of fetching and caching).
    public let chunkSize: Int
    /// Whether the bytes are a packed snapshot.
    public let isPacked: Bool
    /// What was opened (path or URL as given).
    public let location: String
    /// The ETag pinned at open ("" for local files and servers that send none).
    public let etag: String

    init(handle: OpaquePointer, location: String) {
        self.handle = handle
        self.location = location
        length = Int(cunet_source_length(handle))
        chunkSize = Int(cunet_source_chunk_size(handle))
        isPacked = cunet_source_is_packed(handle) != 0
        etag = String(cString: cunet_source_etag(handle))
    }

    deinit { cunet_source_free(handle) }

    /// Opens a local packed snapshot (`cunet_source_open` with a path).
    public convenience init(packedPath path: String, options: RemoteOptions = RemoteOptions()) throws(UffdError) {
        var config = cunet_source_config()
        let result = path.withCString { (p) -> Result<OpaquePointer, UffdError> in
            config.path = p
            do throws(UffdError) { return .success(try ChunkedSource.open(&config, options: options, what: path)) }
            catch { return .failure(error) }
        }
        self.init(handle: try result.get(), location: path)
    }

    /// Opens a remote object (`cunet_object_open`: HEAD for size and ETag, then
    /// `cunet_source_open`): packed or raw, decided by its first bytes.
    public convenience init(url: String, options: RemoteOptions = RemoteOptions()) throws(UffdError) {
        let target = try RemoteTarget(url, options: options)
        let object = try target.open(options)
        var config = cunet_source_config()
        config.object = object
        self.init(handle: try ChunkedSource.open(&config, options: options, what: url), location: url)
    }

    static func open(_ config: inout cunet_source_config, options: RemoteOptions, what: String) throws(UffdError) -> OpaquePointer {
        config.max_connections = Int32(options.maxConnections)
        config.cache_bytes = options.cacheBytes
        config.readahead_chunks = options.readaheadChunks == 0 ? -1 : Int32(options.readaheadChunks)
        config.negative_ms = max(1, Int(options.failedChunkHold * 1000))
        config.raw_chunk_size = UInt32(clamping: options.rawChunkSize)
        var out: OpaquePointer?
        let (rc, reason) = withErrorBuffer { cunet_source_open(&config, &out, $0, $1) }
        guard rc == 0, let out else { throw UffdError(.source, rc: rc, detail: reason.isEmpty ? what : reason) }
        return out
    }

    /// Copies the bytes into `scratch` (`cunet_source_read`), waiting for the chunk's fetch
    /// when it is not cached.
    public func bytes(at offset: Int, count: Int, scratch: UnsafeMutableRawPointer?) throws -> UnsafeRawPointer {
        guard let scratch else { throw UffdError(.source, .noBufferSpace, detail: "ChunkedSource needs scratch memory") }
        guard offset >= 0 else { throw UffdError(.source, .invalidArgument, detail: "negative offset \(offset)") }
        let (rc, reason) = withErrorBuffer { cunet_source_read(handle, UInt64(offset), count, scratch, $0, $1) }
        if rc < 0 { throw UffdError(.source, rc: rc, detail: reason) }
        return UnsafeRawPointer(scratch)
    }

    /// Whether `[offset, offset+count)` lies in chunks the packed index marks all-zero
    /// (`cunet_source_is_zero`; never blocks).
    public func isZero(at offset: Int, count: Int) -> Bool {
        offset >= 0 && cunet_source_is_zero(handle, UInt64(offset), count) != 0
    }

    /// Starts bringing chunk `chunk` into the cache and calls `done` with 0 or -errno when it is
    /// there (`cunet_source_prefetch`): at once on this thread when cached, else on the fetcher
    /// thread, joining a fetch already in flight. The building block of a deferred policy.
    public func prefetch(chunk: Int, context: UnsafeMutableRawPointer?,
                         done: @convention(c) (UnsafeMutableRawPointer?, Int32, UnsafePointer<CChar>?) -> Void) -> Int32 {
        cunet_source_prefetch(handle, UInt64(chunk), done, context)
    }

    /// Cache and transfer counters.
    public struct Counters: Sendable, Equatable {
        /// Reads served from the cache.
        public var hits: UInt64
        /// Reads that started a fetch.
        public var misses: UInt64
        /// Reads that joined a fetch in flight (single flight).
        public var joined: UInt64
        /// Chunks evicted to make room.
        public var evictions: UInt64
        /// Range requests completed (successfully or not).
        public var requests: UInt64
        /// Requests retried.
        public var retries: UInt64
        /// Body bytes received.
        public var bytes: UInt64
    }

    /// The counters so far.
    public var counters: Counters {
        var c = cunet_source_counters()
        cunet_source_get_counters(handle, &c)
        return Counters(hits: c.hits, misses: c.misses, joined: c.joined, evictions: c.evictions,
                        requests: c.requests, retries: c.retries, bytes: c.bytes)
    }
}

/// Runs `body` with a stack buffer for a C reason line; returns its result and the line.
@inline(__always)
func withErrorBuffer(_ body: (UnsafeMutablePointer<CChar>, Int) -> Int32) -> (Int32, String) {
    withUnsafeTemporaryAllocation(of: CChar.self, capacity: Int(CUNET_ERR_LEN)) { buf in
        buf[0] = 0
        let rc = body(buf.baseAddress!, buf.count)
        return (rc, rc < 0 ? String(cString: buf.baseAddress!) : "")
    }
}

/// An `http(s)://` or `s3://` location resolved to the URL requested and its signing.
struct RemoteTarget {
    var url: String
    var sigv4: String?
    var key: String?
    var secret: String?
    var token: String?

    init(_ spec: String, options: RemoteOptions) throws(UffdError) {
        if spec.hasPrefix("http://") || spec.hasPrefix("https://") {
            url = spec
            return
        }
        guard spec.hasPrefix("s3://") else {
            throw UffdError(.argument, .invalidArgument, detail: "\(spec): use http://, https:// or s3://bucket/key")
        }
        let rest = spec.dropFirst(5)
        guard let slash = rest.firstIndex(of: "/"), slash != rest.startIndex, rest.index(after: slash) != rest.endIndex else {
            throw UffdError(.argument, .invalidArgument, detail: "\(spec): an S3 location is s3://BUCKET/KEY")
        }
        let bucket = String(rest[..<slash])
        let objectKey = percentEncodePath(String(rest[rest.index(after: slash)...]))
        let region = options.region ?? env("AWS_REGION") ?? env("AWS_DEFAULT_REGION") ?? "us-east-1"
        if var endpoint = options.endpoint {
            while endpoint.hasSuffix("/") { endpoint.removeLast() }
            guard endpoint.hasPrefix("http://") || endpoint.hasPrefix("https://") else {
                throw UffdError(.argument, .invalidArgument, detail: "--endpoint \(endpoint): use http://HOST:PORT or https://HOST")
            }
            // Custom stores: path-style (no wildcard DNS needed).
            url = "\(endpoint)/\(bucket)/\(objectKey)"
        } else if bucket.contains(".") {
            // Dotted bucket names break the wildcard certificate of virtual-hosted style.
            url = "https://s3.\(region).amazonaws.com/\(bucket)/\(objectKey)"
        } else {
            url = "https://\(bucket).s3.\(region).amazonaws.com/\(objectKey)"
        }
        sigv4 = "aws:amz:\(region):s3"
        key = env("AWS_ACCESS_KEY_ID")
        secret = env("AWS_SECRET_ACCESS_KEY")
        token = env("AWS_SESSION_TOKEN")
        guard key != nil, secret != nil else {
            throw UffdError(.source, .permissionDenied,
                            detail: "\(spec): no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones)")
        }
    }

    /// HEAD: size and ETag (`cunet_object_open`).
    func open(_ options: RemoteOptions) throws(UffdError) -> OpaquePointer {
        var out: OpaquePointer?
        let (rc, reason) = url.withCString { u in
            withOptionalCString(sigv4) { s in withOptionalCString(key) { k in withOptionalCString(secret) { sec in
                withOptionalCString(token) { t in
                    var c = cunet_object_config()
                    c.url = u
                    c.aws_sigv4 = s
                    c.aws_key = k
                    c.aws_secret = sec
                    c.aws_token = t
                    c.connect_timeout_ms = Int(options.connectTimeout * 1000)
                    c.request_timeout_ms = Int(options.requestTimeout * 1000)
                    c.retries = Int32(options.retries)
                    c.backoff_ms = Int(options.backoff * 1000)
                    return withErrorBuffer { cunet_object_open(&c, &out, $0, $1) }
                }
            } } }
        }
        guard rc == 0, let out else { throw UffdError(.source, rc: rc, detail: reason) }
        return out
    }
}

private func env(_ name: String) -> String? {
    guard let v = getenv(name) else { return nil }
    let s = String(cString: v)
    return s.isEmpty ? nil : s
}

private func withOptionalCString<R>(_ s: String?, _ body: (UnsafePointer<CChar>?) -> R) -> R {
    guard let s else { return body(nil) }
    return s.withCString { body($0) }
}

/// RFC 3986 encoding of an object key, keeping `/` (SigV4 signs the encoded path).
func percentEncodePath(_ key: String) -> String {
    var out = ""
    for b in key.utf8 {
        switch b {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
             UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "_"),
             UInt8(ascii: "."), UInt8(ascii: "~"), UInt8(ascii: "/"):
            out.unicodeScalars.append(Unicode.Scalar(b))
        default:
            let hex = Array("0123456789ABCDEF".utf8)
            out += "%" + String(UnicodeScalar(hex[Int(b >> 4)])) + String(UnicodeScalar(hex[Int(b & 15)]))
        }
    }
    return out
}
