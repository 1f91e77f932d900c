import ArgumentParser
import Foundation
import UffdKit

/// How remote sources are reached; shared by every subcommand that names a source
/// (`copy --source`, `snapshot unpack|info`, and `serve --memory-file` through
/// ``RemoteSourceOptions/open(_:)``).
struct RemoteSourceOptions: ParsableArguments {
    @Option(help: ArgumentHelp("S3-compatible endpoint for s3:// sources (e.g. http://127.0.0.1:9000; path-style requests). Default: AWS S3.",
                               valueName: "url"))
    var endpoint: String?

    @Option(help: ArgumentHelp("SigV4 region for s3:// sources (default: AWS_REGION, AWS_DEFAULT_REGION, us-east-1).",
                               valueName: "region"))
    var region: String?

    @Option(help: "Parallel connections per remote source.")
    var connections: Int = 8

    @Option(name: .customLong("chunk-cache"),
            help: ArgumentHelp("Memory for fetched/decompressed chunks per source (e.g. 256M).", valueName: "size"))
    var chunkCache: String = "256M"

    @Option(name: .customLong("request-timeout"), help: "Seconds a range request may take before it is retried.")
    var requestTimeout: Double = 30

    @Option(help: "Retries of a failed request (5xx, timeout, dropped connection), with exponential backoff.")
    var retries: Int = 3

    /// The library options these flags describe.
    func options() throws(CLIError) -> RemoteOptions {
        guard connections >= 1, connections <= 256 else { throw .usage("--connections must be 1...256 (got \(connections))") }
        guard requestTimeout > 0, requestTimeout.isFinite else { throw .usage("--request-timeout must be a positive number of seconds") }
        guard retries >= 0, retries <= 20 else { throw .usage("--retries must be 0...20 (got \(retries))") }
        var o = RemoteOptions()
        o.endpoint = endpoint
        o.region = region
        o.maxConnections = connections
        o.cacheBytes = try parseSize(chunkCache, option: "--chunk-cache")
        o.requestTimeout = requestTimeout
        o.retries = retries
        return o
    }

    /// Opens a source by name (``PageSources/open(_:options:)``) with one clear line on failure:
    /// exit 2 for a name that cannot be used, 1 for a source that cannot be reached or read.
    func open(_ spec: String) throws(CLIError) -> any PageSource {
        let o = try options()
        do {
            return try PageSources.open(spec, options: o)
        } catch {
            throw sourceError(spec, error)
        }
    }
}

/// One line for a source that failed to open or read.
func sourceError(_ spec: String, _ error: UffdError) -> CLIError {
    let reason = error.detail.isEmpty ? "\(error.errno)" : error.detail
    return error.operation == .argument ? .usage("source \(spec): \(reason)") : .failed("source \(spec): \(reason)")
}

/// `uffdctl snapshot`: packed snapshots (pack, unpack, info).
struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Packed snapshots: independently compressed zstd chunks plus an index, in one file.",
        discussion: """
            A packed snapshot is a page source wherever a source is named (copy --source \
            file:PATH, http(s)://, s3://): one range request per frame, all-zero chunks not \
            stored and served with UFFDIO_ZEROPAGE, a corrupt frame an error naming the frame.
            """ + exitCodesHelp,
        subcommands: [PackCommand.self, UnpackCommand.self, InfoCommand.self]
    )

    struct PackCommand: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "pack", abstract: "Pack a raw memory file into a packed snapshot.")

        @Argument(help: "The raw memory file.") var memfile: String
        @Argument(help: "The packed snapshot to write.") var out: String
        @Option(name: .customLong("chunk-size"), help: ArgumentHelp("Bytes per chunk, a power of two 4K...64M.", valueName: "size"))
        var chunkSize: String = "2M"
        @Option(help: "zstd level 1...19.") var level: Int = 3
        @Option(name: .customLong("working-set"),
                help: ArgumentHelp("Store the chunks of this working set (recorded from this memory file) first, in recorded order, so one sequential read brings them all.", valueName: "file"))
        var workingSet: String?
        @Flag(help: "Print one JSON object.") var json = false

        func run() throws {
            let chunk = try parseSize(chunkSize, option: "--chunk-size")
            var first: [Int] = []
            if let workingSet {
                first = try workingSetChunks(workingSet, memfile: memfile, chunkSize: chunk)
            }
            let start = Date()
            let s: PackedSnapshot.PackStats
            do { s = try PackedSnapshot.pack(memfile, to: out, chunkSize: chunk, level: level, firstChunks: first) }
            catch { throw error.errno == .invalidArgument ? CLIError.usage("snapshot pack: \(error.detail)") : CLIError.failed("snapshot pack: \(error.detail)") }
            let seconds = Date().timeIntervalSince(start)
            if json {
                printJSONObject(["raw_bytes": s.rawLength, "packed_bytes": s.packedLength, "chunks": s.chunks,
                           "zero_chunks": s.zeroChunks, "stored_bytes": s.storedBytes, "ratio": s.ratio, "seconds": seconds,
                           "working_set_chunks": s.firstChunks, "working_set_frames_end": s.firstEnd])
            } else {
                print("packed       \(memfile) -> \(out)")
                print("chunks       \(s.chunks) of \(formatBytes(chunk)) (\(s.zeroChunks) all-zero, not stored)")
                print("size         \(formatBytes(s.rawLength)) -> \(formatBytes(s.packedLength)) (ratio \(String(format: "%.2f", s.ratio)))")
                if workingSet != nil {
                    print("working set  \(s.firstChunks) chunks first: frames in bytes 4096..<\(s.firstEnd) (\(formatBytes(s.firstEnd - 4096)), one read)")
                }
                print("time         \(String(format: "%.2f", seconds)) s")
            }
        }
    }

    struct UnpackCommand: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "unpack", abstract: "Write the raw memory file of a packed snapshot (path or URL), byte for byte.")

        @Argument(help: "The packed snapshot: a path, http(s):// or s3:// URL.") var packed: String
        @Argument(help: "The raw file to write.") var out: String
        @OptionGroup var remote: RemoteSourceOptions

        func run() throws {
            let o = try remote.options()
            let bytes: Int
            do { bytes = try PackedSnapshot.unpack(packed, to: out, options: o) }
            catch { throw sourceError(packed, error) }
            print("unpacked     \(packed) -> \(out) (\(formatBytes(bytes)))")
        }
    }

    struct InfoCommand: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "info", abstract: "Print the layout and compression ratio of a packed snapshot.")

        @Argument(help: "The packed snapshot: a path, http(s):// or s3:// URL.") var packed: String
        @OptionGroup var remote: RemoteSourceOptions
        @Flag(help: "Print one JSON object.") var json = false

        func run() throws {
            let o = try remote.options()
            let i: PackedSnapshot.Info
            do { i = try PackedSnapshot.info(packed, options: o) }
            catch { throw sourceError(packed, error) }
            if json {
                printJSONObject(["location": i.location, "chunk_size": i.chunkSize, "raw_bytes": i.rawLength, "chunks": i.chunks,
                           "stored_chunks": i.storedChunks, "zero_chunks": i.zeroChunks, "stored_bytes": i.storedBytes,
                           "packed_bytes": i.packedLength, "largest_frame": i.largestFrame, "ratio": i.ratio, "etag": i.etag])
            } else {
                print("snapshot     \(i.location)\(i.etag.isEmpty ? "" : " (ETag \(i.etag))")")
                print("image        \(formatBytes(i.rawLength)) in \(i.chunks) chunks of \(formatBytes(i.chunkSize))")
                print("stored       \(i.storedChunks) zstd frames, \(formatBytes(i.storedBytes)) (largest \(formatBytes(i.largestFrame)))")
                print("zero         \(i.zeroChunks) chunks not stored (served with ZEROPAGE)")
                print("packed       \(formatBytes(i.packedLength)), ratio \(String(format: "%.2f", i.ratio))")
            }
        }
    }
}

/// Prints one JSON object on stdout, keys sorted.
private func printJSONObject(_ object: [String: Any]) {
    let data = (try? JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])) ?? Data("{}".utf8)
    print(String(decoding: data, as: UTF8.self))
}

/// The chunks of a working set recorded from `memfile`, in recorded order (each once); exit 2
/// when the recording is of another image.
func workingSetChunks(_ path: String, memfile: String, chunkSize: Int) throws(CLIError) -> [Int] {
    let ws = try loadWorkingSet(path)
    let identity: WorkingSet.Identity
    do {
        identity = try WorkingSet.Identity(of: try FileSource(path: memfile))
    } catch {
        throw .usage("snapshot pack: cannot read \(memfile): \(error)")
    }
    do {
        try ws.check(against: identity, servedLength: identity.size)
    } catch {
        throw .usage("--working-set \(path): \(error.detail)")
    }
    guard chunkSize > 0 else { return [] }
    var seen = Set<Int>(), out: [Int] = []
    for e in ws.entries where seen.insert(e.offset / chunkSize).inserted { out.append(e.offset / chunkSize) }
    return out
}
