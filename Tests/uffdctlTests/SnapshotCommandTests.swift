import Foundation
import TestServers
import XCTest

/// `uffdctl snapshot pack|unpack|info` and `copy --source` with packed, HTTP and S3 sources,
/// end to end through the built binary. Servers are started by the tests (nginx, moto) and
/// skipped with the reason when they cannot start.
final class SnapshotCommandTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("uffdctl-snap-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o755])
    }

    override func tearDown() { try? FileManager.default.removeItem(at: dir) }

    /// 9 MiB + a tail: random and compressible chunks, two all-zero 2 MiB chunks.
    func writeImage(_ name: String = "mem") throws -> URL {
        let chunk = 2 << 20
        var d = Data(count: 4 * chunk + 777)
        d.withUnsafeMutableBytes { b in
            var x: UInt64 = 99
            let w = b.baseAddress!.assumingMemoryBound(to: UInt64.self)
            for i in (chunk / 8)..<(chunk / 8 + chunk / 16) { x = x &* 6364136223846793005 &+ 1; w[i] = x }
            memset(b.baseAddress! + 3 * chunk, 0x33, chunk + 777)
        }
        let url = dir.appendingPathComponent(name)
        try d.write(to: url)
        return url
    }

    /// FNV-1a 64 of a file, as `uffdctl copy` reports the restored region's.
    func fnv(_ url: URL) throws -> String {
        var h: UInt64 = 0xcbf29ce484222325
        for b in try Data(contentsOf: url) { h ^= UInt64(b); h = h &* 0x100000001b3 }
        return String(h, radix: 16)
    }

    func testPackInfoUnpackRoundTrip() throws {
        let mem = try writeImage()
        let pak = dir.appendingPathComponent("mem.pak")
        let p = try runUffdctl(["snapshot", "pack", mem.path, pak.path, "--json"])
        XCTAssertEqual(p.code, 0, p.stderr)
        XCTAssertEqual(number(p.json, "chunks"), 5)
        XCTAssertEqual(number(p.json, "zero_chunks"), 2)
        let i = try runUffdctl(["snapshot", "info", pak.path, "--json"])
        XCTAssertEqual(i.code, 0, i.stderr)
        XCTAssertEqual(number(i.json, "raw_bytes"), Double(8 << 20 + 777))
        XCTAssertEqual(number(i.json, "stored_chunks"), 3)
        XCTAssertGreaterThan(number(i.json, "ratio") ?? 0, 1.5)
        let human = try runUffdctl(["snapshot", "info", pak.path])
        XCTAssertTrue(human.stdout.contains("2 chunks not stored"), human.stdout)
        let back = dir.appendingPathComponent("back")
        let u = try runUffdctl(["snapshot", "unpack", pak.path, back.path])
        XCTAssertEqual(u.code, 0, u.stderr)
        XCTAssertEqual(try Data(contentsOf: back), try Data(contentsOf: mem))
    }

    /// copy --source file:PACKED restores through the packed source (zero chunks by ZEROPAGE),
    /// every byte verified, and the region's fingerprint equals the raw file's.
    func testCopyFromPackedFile() throws {
        let mem = try writeImage()
        let pak = dir.appendingPathComponent("mem.pak")
        XCTAssertEqual(try runUffdctl(["snapshot", "pack", mem.path, pak.path]).code, 0)
        let r = try runUffdctl(["copy", "--source", "file:\(pak.path)", "--json", "--quiet"])
        XCTAssertEqual(r.code, 0, r.stderr)
        XCTAssertEqual(r.json?["verified"] as? Bool, true)
        XCTAssertEqual(r.json?["packed"] as? Bool, true)
        XCTAssertEqual(r.json?["region_fnv64"] as? String, try fnv(mem))
        let zeropages = (r.json?["resolutions"] as? [String: Any])?["zeropage"] as? Int
        XCTAssertEqual(zeropages, 2 * 512, "\(r.stdout)")
    }

    /// A corrupt frame: copy exits 1 naming the frame; unpack exits 1 naming it, no output file.
    func testCorruptFrameNamed() throws {
        let mem = try writeImage()
        let pak = dir.appendingPathComponent("mem.pak")
        XCTAssertEqual(try runUffdctl(["snapshot", "pack", mem.path, pak.path]).code, 0)
        // The first frame (chunk 1) starts right after the 4 KiB header.
        let fd = open(pak.path, O_RDWR)
        var junk = [UInt8](repeating: 0xA5, count: 32)
        XCTAssertEqual(pwrite(fd, &junk, 32, 4096 + 1000), 32)
        close(fd)
        let r = try runUffdctl(["copy", "--source", "file:\(pak.path)", "--json", "--quiet"])
        XCTAssertEqual(r.code, 1, r.stdout)
        XCTAssertTrue(r.stderr.contains("packed frame 1 is corrupt"), r.stderr)
        let back = dir.appendingPathComponent("back")
        let u = try runUffdctl(["snapshot", "unpack", pak.path, back.path])
        XCTAssertEqual(u.code, 1)
        XCTAssertTrue(u.stderr.contains("packed frame 1 is corrupt"), u.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: back.path))
    }

    func testBadInput() throws {
        let mem = try writeImage()
        let i = try runUffdctl(["snapshot", "info", mem.path])
        XCTAssertEqual(i.code, 2)
        XCTAssertTrue(i.stderr.contains("is not a packed snapshot"), i.stderr)
        let p = try runUffdctl(["snapshot", "pack", mem.path, dir.appendingPathComponent("x").path, "--chunk-size", "3000"])
        XCTAssertEqual(p.code, 2)
        XCTAssertTrue(p.stderr.contains("power of two"), p.stderr)
        let m = try runUffdctl(["snapshot", "pack", "/nonexistent/mem", dir.appendingPathComponent("x").path])
        XCTAssertEqual(m.code, 1)
        XCTAssertTrue(m.stderr.contains("cannot read /nonexistent/mem"), m.stderr)
        let u = try runUffdctl(["copy", "--source", "http://127.0.0.1:1/mem"])
        XCTAssertEqual(u.code, 1)
        XCTAssertTrue(u.stderr.contains("refused"), u.stderr)
        let s = try runUffdctl(["copy", "--source", "s3://bucket"])
        XCTAssertEqual(s.code, 2)
        XCTAssertTrue(s.stderr.contains("s3://BUCKET/KEY"), s.stderr)
    }

    /// `uffdctl copy --source s3://…` against moto's S3 (SigV4 verified): raw and packed
    /// objects, every byte verified and the region's fingerprint equal to the file's.
    func testCopyFromS3() throws {
        let moto = try MotoS3()
        defer { moto.stop() }
        let endpoint = moto.endpoint
        let mem = try writeImage()
        let pak = dir.appendingPathComponent("mem.pak")
        XCTAssertEqual(try runUffdctl(["snapshot", "pack", mem.path, pak.path]).code, 0)
        try moto.createBucket("restore")
        try moto.put("restore", "mem", file: mem)
        try moto.put("restore", "mem.pak", file: pak)
        moto.exportCredentials()
        for key in ["mem", "mem.pak"] {
            let r = try runUffdctl(["copy", "--source", "s3://restore/\(key)", "--endpoint", endpoint, "--json", "--quiet"])
            XCTAssertEqual(r.code, 0, r.stderr)
            XCTAssertEqual(r.json?["verified"] as? Bool, true, key)
            XCTAssertEqual(r.json?["region_fnv64"] as? String, try fnv(mem), key)
            XCTAssertEqual(number(r.json, "fallbacks"), 0)
        }
        let missing = try runUffdctl(["copy", "--source", "s3://restore/nope", "--endpoint", endpoint])
        XCTAssertEqual(missing.code, 1)
        XCTAssertTrue(missing.stderr.contains("not found (HTTP 404)"), missing.stderr)
        let info = try runUffdctl(["snapshot", "info", "s3://restore/mem.pak", "--endpoint", endpoint, "--json"])
        XCTAssertEqual(number(info.json, "stored_chunks"), 3, info.stderr)
    }
}
