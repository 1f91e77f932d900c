import ArgumentParser
import CUffd
import Foundation
import UffdKit

/// `uffdctl handoff-client` (hidden, for tests and demos): a process that gives its own memory
/// to a server — maps it, registers it MISSING on a uffd that also takes kernel-mode faults,
/// sends the uffd with its regions (Firecracker's protocol, through UffdKit's `Handoff`),
/// then touches every page and checks it against the memory file.
struct HandoffClientCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "handoff-client",
        abstract: "Testing: hand this process's memory to `uffdctl serve` and verify every page.",
        shouldDisplay: false
    )

    @Option var socket: String
    @Option(name: .customLong("memory-file")) var memoryFile: String
    @Option(help: "Bytes of memory (a multiple of the page size).") var size: String = "8M"
    @Option(help: "Where the first region starts in the memory file.") var offset: String = "0"
    @Option(help: "Regions the memory is split into (laid end to end in the file).") var regions: Int = 1
    @Flag(help: "2 MiB hugetlb pages.") var hugetlb = false
    @Option(name: .customLong("kernel-pages"), help: "Read the first N pages through a syscall (kernel-mode faults).") var kernelPages: Int = 0
    @Option(name: .customLong("remove-pages"), help: "After verifying, MADV_DONTNEED the first N pages and check they read as zeros.") var removePages: Int = 0
    @Option(name: .customLong("touch-delay-us"), help: "Sleep between pages.") var touchDelayUs: UInt32 = 0
    @Option(name: .customLong("expect-sigbus-from"), help: "Pages from this index on may get SIGBUS (a read error test): exit 4 on SIGBUS.") var expectSigbusFrom: Int?
    @Option(help: "Watchdog seconds.") var timeout: UInt32 = 60
    @Option(name: .customLong("remove-concurrently"), help: "A second thread MADV_DONTNEEDs this many pages of the second half while the pages are touched (REMOVE events racing faults); those pages may read as the file's or zeros.") var removeConcurrently: Int = 0
    @Option(help: "Pin this process's faulting thread (and, with --in-process, the handler's reader) to this CPU.") var pin: Int32?
    @Flag(name: .customLong("in-process"), help: "Serve the faults in this process with the same policy stack (benchmark baseline).") var inProcess = false
    @Flag(help: "Time one read per page before verifying; print ns per page.") var bench = false
    @Option(name: .customLong("linger-ms"), help: "After verifying, stay alive this long (the server's periodic lines see the memory).") var lingerMs: UInt32 = 0
    @Flag(name: .customLong("poison-feature"), help: "Also enable UFFD_FEATURE_POISON (Firecracker does not), so the server's poison fallback is possible.") var poisonFeature = false

    func run() throws {
        alarm(timeout)
        let pageSize = hugetlb ? (UffdKit.hugePageSize ?? 2 << 20) : basePageSize
        let length = try parseSize(size, option: "--size")
        let fileOffset = offset == "0" ? 0 : try parseSize(offset, option: "--offset")
        guard length % (pageSize * regions) == 0, regions >= 1 else {
            throw CLIError.usage("--size must be a multiple of regions × page size")
        }
        // Like Firecracker: private anonymous memory (MAP_HUGETLB for 2 MiB guests), a uffd
        // that takes kernel-mode faults with EVENT_REMOVE (and POISON only when asked).
        let flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (hugetlb ? MAP_HUGETLB : 0)
        guard let mem = mmap(nil, length, PROT_READ | PROT_WRITE, flags, -1, 0), mem != MAP_FAILED else {
            throw CLIError.failed("mmap \(length) bytes\(hugetlb ? " of hugetlb" : ""): \(errnoName(errno))")
        }
        let region = (address: UInt(bitPattern: mem), length: length)
        let uffd = try Userfaultfd(features: poisonFeature ? [.eventRemove, .poison] : [.eventRemove], options: [.nonBlocking, .kernelFaults])
        try uffd.register(region.address, length: length, modes: .missing)
        let per = length / regions
        let described = (0..<regions).map {
            GuestRegion(baseHostVirtAddr: region.address + UInt($0 * per), size: per, offset: fileOffset + $0 * per, pageSize: pageSize)
        }
        if let pin { _ = cuffd_pin_self(pin) }
        var conn: Int32 = -1
        var local: ServedProcess? = nil
        if inProcess {
            // The baseline for `serve`'s per-fault cost: the same policy stack in this process.
            let mf = open(memoryFile, O_RDONLY | O_CLOEXEC)
            guard mf >= 0 else { throw CLIError.usage("cannot open \(memoryFile)") }
            var o = ServeOptions()
            o.cpus = pin.map { [Int($0)] }
            let me = PeerCredentials(pid: getpid(), uid: getuid(), gid: getgid())
            let p = try ServedProcess(id: 0, handoff: ReceivedHandoff(uffd: uffd, regions: described, peer: me),
                                      connection: -1, memoryFile: mf, options: o)
            try p.start()
            local = p
        } else {
            do { conn = try Handoff.send(uffd, regions: described, to: socket) } catch {
                throw CLIError.failed("hand-off to \(socket): \(error)")
            }
        }
        defer { if conn >= 0 { close(conn) } }
        defer { local?.handler.stop() }
        var nsPerPage = 0.0
        var sum: UInt64 = 0
        if bench {
            // Timed: one read per page (each a missing fault served by the handler).
            let t0 = cuffd_now_ns()
            for i in 0..<(length / pageSize) {
                sum &+= UInt64(UnsafePointer<UInt8>(bitPattern: region.address + UInt(i * pageSize))!.pointee)
            }
            nsPerPage = Double(cuffd_now_ns() - t0) / Double(length / pageSize)
        }
        // The server holds its own copy of the uffd now; ours stays open like Firecracker's.
        let file = open(memoryFile, O_RDONLY)
        guard file >= 0 else { throw CLIError.usage("cannot open \(memoryFile)") }
        defer { close(file) }
        if expectSigbusFrom != nil { signal(SIGBUS) { _ in _exit(4) } }
        let expected = UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: 4096)
        defer { expected.deallocate() }
        var pipeFDs: [Int32] = [-1, -1]
        guard pipe(&pipeFDs) == 0 else { throw CLIError.failed("pipe") }
        let viaKernel = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        var mismatches = 0
        var kernelChecked = 0
        let pages = length / pageSize
        var racer: Racer? = nil
        if removeConcurrently > 0 {
            racer = Racer(base: region.address, pageSize: pageSize, first: pages / 2, count: pages - pages / 2, removals: removeConcurrently)
        }
        for i in 0..<pages {
            let p = UnsafeMutableRawPointer(bitPattern: region.address + UInt(i * pageSize))!
            _ = pread(file, expected, pageSize, off_t(fileOffset + i * pageSize))
            if i < kernelPages {
                // write() reads the page in the kernel (copy_from_user): a kernel-mode fault.
                var ok = true
                var off = 0
                while off < pageSize {
                    let n = write(pipeFDs[1], p + off, 4096)
                    guard n == 4096, read(pipeFDs[0], viaKernel, 4096) == 4096 else { ok = false; break }
                    if memcmp(viaKernel, expected + off, 4096) != 0 { ok = false; break }
                    off += 4096
                }
                if ok { kernelChecked += 1 } else { mismatches += 1 }
            } else if memcmp(p, expected, pageSize) != 0 {
                // A page the racer removed reads as zeros (before or after it was served).
                let zero = racer != nil && i >= pages / 2 && (0..<pageSize).allSatisfy { p.load(fromByteOffset: $0, as: UInt8.self) == 0 }
                if !zero { mismatches += 1 }
            }
            if touchDelayUs > 0 { usleep(touchDelayUs) }
        }
        if let racer { racer.join() }
        var removedZero = 0
        if removePages > 0 {
            let n = min(removePages, pages)
            guard madvise(UnsafeMutableRawPointer(bitPattern: region.address)!, n * pageSize, MADV_DONTNEED) == 0 else {
                throw CLIError.failed("madvise(MADV_DONTNEED): \(errnoName(errno))")
            }
            for i in 0..<n {
                let p = UnsafeRawPointer(bitPattern: region.address + UInt(i * pageSize))!.assumingMemoryBound(to: UInt8.self)
                if (0..<pageSize).allSatisfy({ p[$0] == 0 }) { removedZero += 1 }
            }
            // The rest is still the file's.
            if n < pages {
                let p = UnsafeRawPointer(bitPattern: region.address + UInt(n * pageSize))!
                _ = pread(file, expected, pageSize, off_t(fileOffset + n * pageSize))
                if memcmp(p, expected, pageSize) != 0 { mismatches += 1 }
            }
        }
        if lingerMs > 0 { usleep(lingerMs * 1000) }
        let ok = mismatches == 0 && kernelChecked == min(kernelPages, pages) && removedZero == min(removePages, pages)
        if bench { print("{\"ns_per_page\":\(Int(nsPerPage)),\"sum\":\(sum)}") }
        print("{\"pages\":\(pages),\"mismatches\":\(mismatches),\"kernel_pages\":\(kernelChecked),\"removed_zero\":\(removedZero),\"ok\":\(ok)}")
        if !ok { throw ExitCode(1) }
    }
}

/// A thread that removes (MADV_DONTNEED) random pages of a range while another touches them.
final class Racer: @unchecked Sendable {
    private var thread = pthread_t()

    init(base: UInt, pageSize: Int, first: Int, count: Int, removals: Int) {
        let box = Unmanaged.passRetained(Args(base: base, pageSize: pageSize, first: first, count: count, removals: removals))
        pthread_create(&thread, nil, { arg in
            let a = Unmanaged<Args>.fromOpaque(arg!).takeRetainedValue()
            var rng = SystemRandomNumberGenerator()
            for _ in 0..<a.removals {
                let page = a.first + Int.random(in: 0..<max(1, a.count), using: &rng)
                _ = madvise(UnsafeMutableRawPointer(bitPattern: a.base + UInt(page * a.pageSize)), a.pageSize, MADV_DONTNEED)
                usleep(50)
            }
            return nil
        }, box.toOpaque())
    }

    func join() { pthread_join(thread, nil) }

    final class Args {
        let base: UInt, pageSize: Int, first: Int, count: Int, removals: Int
        init(base: UInt, pageSize: Int, first: Int, count: Int, removals: Int) {
            self.base = base; self.pageSize = pageSize; self.first = first; self.count = count; self.removals = removals
        }
    }
}
