import SystemPackage
import UffdKit

enum OutcomeModelSample {
    static func run() throws -> (bytesDone: Int, errno: Errno?, woken: Bool) {
        // --- doc begin outcome-model
        let page = basePageSize
        let region = try MappedRegion(.anonymous(), length: 2 * page)
        let uffd = try Userfaultfd()
        try uffd.register(region.address, length: region.length, modes: .missing)
        let image = MemorySource([UInt8](repeating: 7, count: 2 * page))
        let source = UInt(bitPattern: image.buffer.baseAddress!)

        // The second page is resolved first (by another resolver, say).
        try uffd.copy(to: region.address + UInt(page), from: source + UInt(page), length: page)

        // Copying both pages now stops at the second: EEXIST, with the first page done.
        var bytesDone = 0
        var failure: Errno?
        var woken = false
        do throws(UffdError) {
            bytesDone = try uffd.copy(to: region.address, from: source, length: 2 * page)
        } catch {
            bytesDone = error.bytesDone          // page 0 was copied before the kernel stopped
            failure = error.errno
            if error.errno == .fileExists {      // EEXIST: already resolved; wake whoever waits
                try uffd.wake(region.address + UInt(error.bytesDone), length: 2 * page - error.bytesDone)
                woken = true
            }
        }
        // --- doc end
        return (bytesDone, failure, woken)
    }
}
