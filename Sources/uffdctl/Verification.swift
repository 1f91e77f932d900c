import Foundation
import UffdKit

/// What the region must hold after the workload (before the workers' marker words).
enum ExpectedContent {
    /// All zeros.
    case zero
    /// ``PatternSource`` words with this seed (offset 0 = the region's start).
    case pattern(seed: UInt64)
    /// The first `length` bytes of the file open on `fd`, zeros after.
    case file(fd: Int32, length: Int)
    /// The bytes of a page source (an independent open of the one served: its own fetches).
    case source(any PageSource)

    /// Fills `buffer` with the expected bytes of `[offset, offset+count)`.
    func fill(_ buffer: UnsafeMutableRawPointer, offset: Int, count: Int) throws(CLIError) {
        switch self {
        case .zero:
            memset(buffer, 0, count)
        case .pattern(let seed):
            fillPattern(buffer, offset: offset, count: count, seed: seed)
        case .file(let fd, let length):
            let want = max(0, min(count, length - offset))
            var got = 0
            while got < want {
                let n = pread(fd, buffer + got, want - got, off_t(offset + got))
                if n > 0 { got += n; continue }
                if n < 0 && errno == EINTR { continue }
                if n == 0 { break }
                throw .failed("verification: reading the file at \(offset + got) failed: \(errnoName(errno))")
            }
            if got < count { memset(buffer + got, 0, count - got) }
        case .source(let source):
            do {
                let p = try source.bytes(at: offset, count: count, scratch: buffer)
                if p != UnsafeRawPointer(buffer) { buffer.copyMemory(from: p, byteCount: count) }
            } catch {
                throw .failed("verification: reading the source at \(offset) failed: \(error)")
            }
        }
    }

    var name: String {
        switch self {
        case .zero: "zeros"
        case .pattern: "the pattern"
        case .file: "the file"
        case .source: "the source"
        }
    }
}

/// Writes ``PatternSource`` words for `[offset, offset+count)` (both multiples of 8).
func fillPattern(_ buffer: UnsafeMutableRawPointer, offset: Int, count: Int, seed: UInt64 = 0x5EED) {
    let words = buffer.assumingMemoryBound(to: UInt64.self)
    for i in 0..<count / 8 {
        words[i] = PatternSource.word(at: offset + i * 8, seed: seed)
    }
}

/// The outcome of checking every byte of a region.
struct Verification {
    /// Bytes compared.
    var checkedBytes = 0
    /// Base pages that differed.
    var mismatchedPages = 0
    /// Offset of the first differing byte.
    var firstMismatch: Int?
    /// Pages not checked on purpose (poisoned).
    var skippedPages = 0

    /// True only when every checked byte matched.
    var ok: Bool { mismatchedPages == 0 && checkedBytes > 0 }
}

/// Compares every byte of `[base, base+length)` with `expected`, except pages whose action is
/// `.skip`; pages whose action is `.write` must hold their marker in the first word.
func verifyRegion(base: UInt, length: Int, expected: ExpectedContent, actions: [PageAction]) throws(CLIError) -> Verification {
    let page = basePageSize
    let chunk = 256 * page
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: page)
    defer { buffer.deallocate() }
    var v = Verification()
    var offset = 0
    while offset < length {
        let n = min(chunk, length - offset)
        try expected.fill(buffer, offset: offset, count: n)
        var p = 0
        while p < n {
            let index = (offset + p) / page
            let action = index < actions.count ? actions[index] : .read
            if action == .skip {
                v.skippedPages += 1
                p += page
                continue
            }
            if action == .write {
                buffer.storeBytes(of: Workload.marker(index), toByteOffset: p, as: UInt64.self)
            }
            let region = UnsafeRawPointer(bitPattern: base + UInt(offset + p))!
            if memcmp(region, buffer + p, page) != 0 {
                v.mismatchedPages += 1
                if v.firstMismatch == nil {
                    var b = 0
                    while b < page, region.load(fromByteOffset: b, as: UInt8.self) == buffer.load(fromByteOffset: p + b, as: UInt8.self) { b += 1 }
                    v.firstMismatch = offset + p + b
                }
            }
            v.checkedBytes += page
            p += page
        }
        offset += n
    }
    return v
}
