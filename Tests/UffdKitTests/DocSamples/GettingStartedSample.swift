import UffdKit

/// The Getting Started article's sample (between the markers, textually identical to the article).
enum GettingStartedSample {
    static func run() throws -> (firstWord: UInt64, stats: HandlerStats) {
        // --- doc begin getting-started
        // 4 MiB of anonymous memory whose pages are filled on first touch.
        let region = try MappedRegion(.anonymous(), length: 4 << 20)
        let uffd = try Userfaultfd()
        try uffd.register(region.address, length: region.length, modes: .missing)

        // Each missing page is copied from a generated image (a file: `FileSource(path:)`).
        let policy = CopyPolicy(region: region, source: PatternSource(length: region.length))
        let handler = FaultHandler(uffd: uffd, policy: policy)
        try handler.start()

        // Any thread may touch the memory now; the first touch of each page waits for the copy.
        let firstWord = region.pointer.load(as: UInt64.self)

        handler.stop()
        let stats = handler.stats()   // faults, resolutions by operation, bytes, latency
        // --- doc end
        return (firstWord, stats)
    }
}
