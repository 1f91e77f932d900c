import Foundation
import SystemPackage
import UffdKit
import XCTest

/// The DocC articles' code samples: each lives in `DocSamples/` between `// --- doc begin NAME`
/// and `// --- doc end`, compiles with the tests, runs here under a watchdog, and must appear in
/// its article verbatim (indentation aside), so the documentation cannot drift from the API.
final class DocSampleTests: XCTestCase {
    private static let testsFolder = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    private static let catalog = testsFolder.appendingPathComponent("../../Sources/UffdKit/UffdKit.docc").standardized

    /// The samples named in the sample files, dedented: name -> lines.
    static func samples() throws -> [String: [String]] {
        var out: [String: [String]] = [:]
        let folder = testsFolder.appendingPathComponent("DocSamples")
        for file in try FileManager.default.contentsOfDirectory(atPath: folder.path) where file.hasSuffix(".swift") {
            let text = try String(contentsOf: folder.appendingPathComponent(file), encoding: .utf8)
            var current: (name: String, lines: [String])?
            for line in text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) {
                let t = line.trimmingCharacters(in: .whitespaces)
                if t.hasPrefix("// --- doc begin ") {
                    current = (String(t.dropFirst("// --- doc begin ".count)), [])
                } else if t == "// --- doc end", let c = current {
                    out[c.name] = dedent(c.lines)
                    current = nil
                } else {
                    current?.lines.append(line)
                }
            }
        }
        return out
    }

    static func dedent(_ lines: [String]) -> [String] {
        let indent = lines.filter { !$0.trimmingCharacters(in: .whitespaces).isEmpty }
            .map { $0.prefix { $0 == " " }.count }.min() ?? 0
        return lines.map { $0.count >= indent ? String($0.dropFirst(indent)) : $0.trimmingCharacters(in: .whitespaces) }
    }

    /// The code blocks of a markdown text, each as its lines.
    static func codeBlocks(_ markdown: String) -> [[String]] {
        var blocks: [[String]] = []
        var current: [String]?
        for line in markdown.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) {
            if line.hasPrefix("```") {
                if let c = current { blocks.append(c); current = nil } else { current = [] }
            } else {
                current?.append(line)
            }
        }
        return blocks
    }

    /// Every sample appears in its article; every swift block of an article is a sample.
    func testArticlesQuoteTheCompiledSamples() throws {
        let samples = try Self.samples()
        let wanted: [String: [String]] = [
            "GettingStarted.md": ["getting-started"],
            "WritingAPolicy.md": ["writing-a-policy", "writing-a-policy-use"],
            "OutcomeModel.md": ["outcome-model"],
            "HandlerGuarantees.md": ["handler-guarantees"],
        ]
        XCTAssertEqual(Set(samples.keys), Set(wanted.values.flatMap { $0 }), "samples without an article or articles without a sample")
        for (article, names) in wanted {
            let text = try String(contentsOf: Self.catalog.appendingPathComponent(article), encoding: .utf8)
            let blocks = Self.codeBlocks(text).map(Self.dedent)
            for name in names {
                let sample = try XCTUnwrap(samples[name], "no sample \(name)")
                XCTAssertTrue(blocks.contains(sample), "\(article) does not quote the sample \(name) verbatim:\n\(sample.joined(separator: "\n"))")
            }
            XCTAssertEqual(blocks.count, names.count, "\(article): a code block that no test compiles")
        }
    }

    func testGettingStartedSampleRuns() throws {
        let r = try runWithWatchdog { try GettingStartedSample.run() }
        XCTAssertEqual(r.firstWord, PatternSource.word(at: 0, seed: 0x5EED))
        XCTAssertEqual(r.stats.faults, 1)
        XCTAssertEqual(r.stats.resolutions[.copy], 1)
    }

    func testWritingAPolicySampleRuns() throws {
        XCTAssertEqual(try runWithWatchdog { try WritingAPolicySample.run() }, [0, 5, 63])
    }

    func testOutcomeModelSampleRuns() throws {
        let r = try runWithWatchdog { try OutcomeModelSample.run() }
        XCTAssertEqual(r.bytesDone, basePageSize)
        XCTAssertEqual(r.errno, .fileExists)
        XCTAssertTrue(r.woken)
    }

    func testHandlerGuaranteesSampleRuns() throws {
        let r = try runWithWatchdog { try touchRefusedPage() }
        XCTAssertEqual(r.byte, 0)
        XCTAssertEqual(r.failures.count, 1)
        XCTAssertTrue(r.failures.first?.policyError is RefusingPolicy.Refused)
        XCTAssertEqual(r.failures.first?.recoveredByFallback, true)
    }

    /// The README's Swift example is the one ReadmeExampleTests runs.
    func testReadmeQuotesItsExample() throws {
        let readme = try String(contentsOf: Self.testsFolder.appendingPathComponent("../../README.md").standardized, encoding: .utf8)
        let test = try String(contentsOf: Self.testsFolder.appendingPathComponent("ReadmeExampleTests.swift"), encoding: .utf8)
        let lines = test.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let begin = try XCTUnwrap(lines.firstIndex { $0.contains("// --- README begin") })
        let end = try XCTUnwrap(lines.firstIndex { $0.contains("// --- README end") })
        let example = Self.dedent(Array(lines[(begin + 1)..<end]))
        let blocks = Self.codeBlocks(readme).map(Self.dedent)
        XCTAssertTrue(blocks.contains { $0.count > example.count && Array($0.suffix(example.count)) == example },
                      "README's Swift block does not end with ReadmeExampleTests' example")
    }

    /// Runs `body` on its own thread; fails (instead of hanging) when it does not finish in 30 s.
    private func runWithWatchdog<T: Sendable>(_ body: @escaping @Sendable () throws -> T) throws -> T {
        let result = Box<Result<T, any Error>?>(nil)
        _ = withWatchdog(30, onTimeout: {}) {
            let r = Result { try body() }
            result.update { $0 = r }
        }
        return try XCTUnwrap(result.value, "the sample did not finish").get()
    }
}
