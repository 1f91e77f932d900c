import Foundation
import XCTest

/// `uffdctl copy --in-thread`: faults resolved by the faulting threads (UFFD_FEATURE_SIGBUS).
final class InThreadCLITests: XCTestCase {
    /// 4 MiB, 3 threads writing in random order: every page faulted once, copied in-thread,
    /// every byte verified; no handler reader.
    func testCopyInThreadJSON() throws {
        let r = try runUffdctl(["copy", "--in-thread", "--size", "4M", "--threads", "3", "--access", "random", "--write", "--json"])
        XCTAssertEqual(r.code, 0, r.stderr)
        let j = r.json
        XCTAssertEqual(flag(j, "verified"), true, r.stdout)
        XCTAssertEqual(flag(j, "in_thread"), true, r.stdout)
        XCTAssertEqual(number(j, "faults"), 1024, r.stdout)
        XCTAssertEqual(number(j, "readers"), 0, r.stdout)
        XCTAssertEqual(number(j?["resolutions"] as? [String: Any], "copy"), 1024, r.stdout)
        XCTAssertEqual(number(j, "fallbacks"), 0, r.stdout)
        // The same latency fields as a handler session: one sample per SIGBUS, in microseconds.
        let lat = j?["fault_latency_us"] as? [String: Any]
        let signals = number(j, "signals") ?? 0
        XCTAssertEqual(number(lat, "samples"), signals, r.stdout)
        XCTAssertGreaterThanOrEqual(signals, 1024, r.stdout)
        let p50 = number(lat, "p50") ?? 0, p99 = number(lat, "p99") ?? 0, max = number(lat, "max") ?? 0
        XCTAssertGreaterThan(p50, 0, r.stdout)
        XCTAssertLessThanOrEqual(p50, p99, r.stdout)
        XCTAssertLessThanOrEqual(p99, max, r.stdout)
    }

    /// The text report of an in-thread session has the handler sessions' latency line.
    func testCopyInThreadTextShowsLatency() throws {
        let r = try runUffdctl(["copy", "--in-thread", "--size", "1M", "--threads", "1"])
        XCTAssertEqual(r.code, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("latency      p50 "), r.stdout)
        XCTAssertTrue(r.stdout.contains("per resolution (256 samples)"), r.stdout)
    }

    /// A file source with a partial last page: pread per fault, the tail past the end is zero.
    func testCopyInThreadFileSource() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("inthread-cli-\(getpid()).bin").path
        defer { unlink(path) }
        let bytes = (0..<(3 * 4096 + 77)).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        let r = try runUffdctl(["copy", "--in-thread", "--source", "file:" + path])
        XCTAssertEqual(r.code, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("verified     every byte of 16.0 KiB matched the file"), r.stdout)
        XCTAssertTrue(r.stdout.contains("in-thread    4 SIGBUS resolved in the faulting threads"), r.stdout)
    }

    /// Zeros on shmem (ZEROPAGE in the faulting thread).
    func testCopyInThreadZeroShmem() throws {
        let r = try runUffdctl(["copy", "--in-thread", "--source", "zero", "--memory", "shmem", "--size", "2M"])
        XCTAssertEqual(r.code, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("resolutions  zeropage 512"), r.stdout)
        XCTAssertTrue(r.stdout.contains("matched zeros"), r.stdout)
    }

    /// `zeropage --in-thread` and `continue --in-thread` (MINOR shmem, writes land in the page cache).
    func testZeropageAndContinueInThread() throws {
        let z = try runUffdctl(["zeropage", "--in-thread", "--size", "2M", "--json"])
        XCTAssertEqual(z.code, 0, z.stderr)
        XCTAssertEqual(flag(z.json, "verified"), true, z.stdout)
        XCTAssertEqual(number(z.json?["resolutions"] as? [String: Any], "zeropage"), 512, z.stdout)
        let c = try runUffdctl(["continue", "--in-thread", "--size", "2M", "--write", "--json"])
        XCTAssertEqual(c.code, 0, c.stderr)
        XCTAssertEqual(c.json?["memory"] as? String, "shmem", c.stdout)
        XCTAssertEqual(number(c.json?["faults_by_kind"] as? [String: Any], "minor"), 512, c.stdout)
        XCTAssertEqual(number(c.json?["resolutions"] as? [String: Any], "continue"), 512, c.stdout)
        XCTAssertEqual(flag(c.json, "verified"), true, c.stdout)
    }

    /// `move --in-thread`: each faulting thread moves its page from the donor (4 KiB and 2 MiB
    /// granules); every granule moved once.
    func testMoveInThread() throws {
        for extra in [[], ["--huge"]] {
            let r = try runUffdctl(["move", "--in-thread", "--size", "8M", "--write", "--json"] + extra)
            XCTAssertEqual(r.code, 0, r.stderr)
            let granules = extra.isEmpty ? 2048.0 : 4.0
            XCTAssertEqual(number(r.json?["resolutions"] as? [String: Any], "move"), granules, r.stdout)
            XCTAssertEqual(flag(r.json, "verified"), true, r.stdout)
        }
        let bad = try runUffdctl(["move", "--in-thread", "--compare-copy"])
        XCTAssertEqual(bad.code, 2, bad.stderr)
    }

    /// Options that do not apply are refused in one line, exit 2.
    func testInThreadRefusesReadahead() throws {
        let r = try runUffdctl(["copy", "--in-thread", "--readahead", "64K"])
        XCTAssertEqual(r.code, 2)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("--in-thread") && r.stderr.contains("--readahead"), r.stderr)
    }
}
