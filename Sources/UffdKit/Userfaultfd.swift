import CUffd
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// An open userfaultfd after the UFFDIO_API handshake. Owns the fd and closes it on deinit
/// (closing wakes every blocked thread; their faults then resolve as if never registered).
///
/// Every verb has one spelling: an address (`UInt`, what the kernel sees) and a `length`;
/// for a pointer write `UInt(bitPattern: p)`, for a whole region pass the ``MappedRegion``.
/// Every resolve operation returns the bytes done or throws ``UffdError`` with
/// `bytesDone` set to the partial progress.
public final class Userfaultfd: Sendable {
    /// How to open the fd.
    public struct Options: OptionSet, Sendable, Hashable {
        /// Raw option bits.
        public let rawValue: Int
        /// Wraps raw option bits.
        public init(rawValue: Int) { self.rawValue = rawValue }
        /// Also handle faults the kernel takes on the memory (copy_from_user and friends).
        /// Needs privileges where `vm.unprivileged_userfaultfd=0`. Off by default: the fd then
        /// handles user-mode faults only (UFFD_USER_MODE_ONLY), which anyone may open.
        public static let kernelFaults = Options(rawValue: 1 << 0)
        /// Open with O_NONBLOCK: read() returns no message instead of waiting. The fault
        /// handler needs it.
        public static let nonBlocking = Options(rawValue: 1 << 1)
        /// Never fall back to /dev/userfaultfd when the syscall is refused.
        public static let noDevice = Options(rawValue: 1 << 2)
        /// Open through /dev/userfaultfd only.
        public static let deviceOnly = Options(rawValue: 1 << 3)
        /// The defaults: user-mode faults only, non-blocking.
        public static let `default`: Options = [.nonBlocking]
    }

    /// The file descriptor (-1 after ``close()``).
    public var fd: Int32 { _fd.load(ordering: .acquiring) }
    private let _fd: Atomic<Int32>
    /// The features enabled on this fd (exactly the requested ones).
    public let features: Features
    /// The fd-level ioctls the kernel reported.
    public let ioctls: Ioctls
    /// Whether the fd handles user-mode faults only.
    public let userModeOnly: Bool
    /// Whether the fd came from /dev/userfaultfd rather than the syscall.
    public let openedThroughDevice: Bool

    /// Opens a userfaultfd and enables `features`.
    /// - Throws: ``UffdError`` for `.open` (see its explanation: EPERM means the sysctl, the
    ///   device permissions or user-mode-only) or `.api` (a feature is not available).
    public init(features: Features = [], options: Options = .default) throws(UffdError) {
        var flags: Int32 = 0
        if options.contains(.nonBlocking) { flags |= Int32(CUFFD_OPEN_NONBLOCK.rawValue) }
        if !options.contains(.kernelFaults) { flags |= Int32(CUFFD_OPEN_USER_MODE_ONLY.rawValue) }
        if options.contains(.noDevice) { flags |= Int32(CUFFD_OPEN_NO_DEVICE.rawValue) }
        if options.contains(.deviceOnly) { flags |= Int32(CUFFD_OPEN_DEVICE_ONLY.rawValue) }
        var path: Int32 = 0
        var umo = false
        let fd = cuffd_open(flags, &path, &umo)
        guard fd >= 0 else { throw UffdError(.open, rc: fd) }
        var granted: UInt64 = 0
        var mask: UInt64 = 0
        let rc = cuffd_api(fd, features.rawValue, &granted, &mask)
        guard rc == 0 else {
            Glibc.close(fd)
            let missing = Features(rawValue: features.rawValue & ~((try? Userfaultfd.probe().rawValue) ?? ~0))
            throw UffdError(.api, rc: rc, detail: missing.isEmpty ? "requested \(features)" : "not offered: \(missing)")
        }
        self._fd = Atomic(fd)
        self.features = Features(rawValue: granted)
        self.ioctls = Ioctls(rawValue: mask)
        self.userModeOnly = umo
        self.openedThroughDevice = path == Int32(CUFFD_OPEN_DEVICE.rawValue)
    }

    /// Takes ownership of a userfaultfd that already had its UFFDIO_API handshake: one received
    /// from another process over a UNIX socket (SCM_RIGHTS), or a forked child's fd.
    /// `features` are the ones the handshake enabled (what the sender negotiated): the kernel
    /// has no call that reports them again. The fd is closed on deinit like any other.
    /// ``ioctls`` is the fd-level set every handshake reports (API, REGISTER, UNREGISTER).
    /// Assumes the fd handles kernel-mode faults too (the kernel cannot be asked); use
    /// ``init(adopting:features:userModeOnly:)`` when the sender says otherwise.
    public convenience init(adopting fd: Int32, features: Features) {
        self.init(adopting: fd, features: features, userModeOnly: false)
    }

    /// Takes ownership of a userfaultfd that already had its UFFDIO_API handshake, with what
    /// its opener knows: the enabled `features` and whether it was opened UFFD_USER_MODE_ONLY.
    public init(adopting fd: Int32, features: Features, userModeOnly: Bool) {
        self._fd = Atomic(fd)
        self.features = features
        self.ioctls = [.api, .register, .unregister]
        self.userModeOnly = userModeOnly
        self.openedThroughDevice = false
    }

    deinit { close() }

    /// Closes the fd now (idempotent). Threads blocked on its faults are woken and retry the
    /// access as if the memory were not registered. A running ``FaultHandler`` holds its own
    /// descriptor of the file: it keeps serving until ``FaultHandler/stop()``, which releases it.
    public func close() {
        let fd = _fd.exchange(-1, ordering: .acquiringAndReleasing)
        if fd >= 0 { _ = Glibc.close(fd) }
    }

    /// The features the kernel offers (UFFDIO_API on a throwaway fd).
    public static func probe() throws(UffdError) -> Features {
        var f: UInt64 = 0
        var i: UInt64 = 0
        let rc = cuffd_probe(&f, &i)
        guard rc == 0 else { throw UffdError(rc == -EPERM || rc == -EACCES ? .open : .api, rc: rc) }
        return Features(rawValue: f)
    }

    // MARK: Registration

    /// Registers `[start, start+length)` for `modes`; returns the ioctls available on it.
    @discardableResult
    public func register(_ start: UInt, length: Int, modes: RegisterMode) throws(UffdError) -> Ioctls {
        var mask: UInt64 = 0
        let rc = cuffd_register(fd, UInt64(start), UInt64(length), modes.rawValue, &mask)
        guard rc == 0 else {
            throw UffdError(.register, rc: rc, detail: "\(hex(start))+\(length) modes \(modes)")
        }
        return Ioctls(rawValue: mask)
    }

    /// Registers a whole mapped region for `modes`; returns the range's ioctls.
    @discardableResult
    public func register(_ region: MappedRegion, modes: RegisterMode) throws(UffdError) -> Ioctls {
        try register(region.address, length: region.length, modes: modes)
    }

    /// Unregisters a whole mapped region.
    public func unregister(_ region: MappedRegion) throws(UffdError) {
        try unregister(region.address, length: region.length)
    }

    /// Unregisters `[start, start+length)`.
    public func unregister(_ start: UInt, length: Int) throws(UffdError) {
        let rc = cuffd_unregister(fd, UInt64(start), UInt64(length))
        guard rc == 0 else { throw UffdError(.unregister, rc: rc, detail: "\(hex(start))+\(length)") }
    }

    // MARK: Resolve verbs

    private func done(_ op: UffdError.Operation, _ rc: Int32, _ done: Int64, _ dst: UInt, _ len: Int) throws(UffdError) -> Int {
        guard rc == 0 else { throw UffdError(op, rc: rc, bytesDone: done, detail: "\(hex(dst))+\(len)") }
        return Int(done)
    }

    /// UFFDIO_COPY: copies `length` bytes from `source` (this process) to `destination` and
    /// wakes the waiters (unless `dontWake`); `writeProtect` maps the pages write-protected.
    @discardableResult
    public func copy(to destination: UInt, from source: UInt, length: Int, dontWake: Bool = false,
                     writeProtect: Bool = false) throws(UffdError) -> Int {
        var d: Int64 = 0
        var mode: UInt64 = dontWake ? UInt64(UFFDIO_COPY_MODE_DONTWAKE) : 0
        if writeProtect { mode |= UInt64(UFFDIO_COPY_MODE_WP) }
        let rc = cuffd_copy(fd, UInt64(destination), UInt64(source), UInt64(length), mode, &d)
        return try done(.copy, rc, d, destination, length)
    }

    /// UFFDIO_ZEROPAGE: maps zero pages on `[start, start+length)`.
    @discardableResult
    public func zeropage(_ start: UInt, length: Int, dontWake: Bool = false) throws(UffdError) -> Int {
        var d: Int64 = 0
        let rc = cuffd_zeropage(fd, UInt64(start), UInt64(length), dontWake ? UInt64(UFFDIO_ZEROPAGE_MODE_DONTWAKE) : 0, &d)
        return try done(.zeropage, rc, d, start, length)
    }

    /// UFFDIO_MOVE: moves the pages at `source` (exclusive to this process) to `destination`.
    /// EBUSY means the source is shared (use a MADV_DONTFORK donor).
    @discardableResult
    public func move(to destination: UInt, from source: UInt, length: Int, dontWake: Bool = false,
                     allowSourceHoles: Bool = false) throws(UffdError) -> Int {
        var d: Int64 = 0
        var mode: UInt64 = dontWake ? UInt64(UFFDIO_MOVE_MODE_DONTWAKE) : 0
        if allowSourceHoles { mode |= UInt64(UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES) }
        let rc = cuffd_move(fd, UInt64(destination), UInt64(source), UInt64(length), mode, &d)
        return try done(.move, rc, d, destination, length)
    }

    /// UFFDIO_CONTINUE: maps the page-cache pages already present for `[start, start+length)`.
    @discardableResult
    public func `continue`(_ start: UInt, length: Int, dontWake: Bool = false,
                           writeProtect: Bool = false) throws(UffdError) -> Int {
        var d: Int64 = 0
        var mode: UInt64 = dontWake ? UInt64(UFFDIO_CONTINUE_MODE_DONTWAKE) : 0
        if writeProtect { mode |= UInt64(UFFDIO_CONTINUE_MODE_WP) }
        let rc = cuffd_continue(fd, UInt64(start), UInt64(length), mode, &d)
        return try done(.continue, rc, d, start, length)
    }

    /// UFFDIO_POISON: accesses to `[start, start+length)` raise SIGBUS.
    @discardableResult
    public func poison(_ start: UInt, length: Int, dontWake: Bool = false) throws(UffdError) -> Int {
        var d: Int64 = 0
        let rc = cuffd_poison(fd, UInt64(start), UInt64(length), dontWake ? UInt64(UFFDIO_POISON_MODE_DONTWAKE) : 0, &d)
        return try done(.poison, rc, d, start, length)
    }

    /// UFFDIO_WRITEPROTECT set: write faults on the range are reported.
    public func writeProtect(_ start: UInt, length: Int) throws(UffdError) {
        let rc = cuffd_writeprotect(fd, UInt64(start), UInt64(length), true, false)
        guard rc == 0 else { throw UffdError(.writeProtect, rc: rc, detail: "\(hex(start))+\(length)") }
    }

    /// UFFDIO_WRITEPROTECT clear: allows writes again and wakes the waiters (unless `dontWake`).
    public func unprotect(_ start: UInt, length: Int, dontWake: Bool = false) throws(UffdError) {
        let rc = cuffd_writeprotect(fd, UInt64(start), UInt64(length), false, dontWake)
        guard rc == 0 else { throw UffdError(.unprotect, rc: rc, detail: "\(hex(start))+\(length)") }
    }

    /// UFFDIO_WAKE: wakes threads waiting on faults in the range.
    public func wake(_ start: UInt, length: Int) throws(UffdError) {
        let rc = cuffd_wake(fd, UInt64(start), UInt64(length))
        guard rc == 0 else { throw UffdError(.wake, rc: rc, detail: "\(hex(start))+\(length)") }
    }

    // MARK: Messages

    /// Reads the queued messages without blocking (at most 64); empty when none is queued.
    /// Use this only when no ``FaultHandler`` runs on the fd. Fork events adopt the child's fd.
    public func readMessages(max: Int = 64) throws(UffdError) -> [Message] {
        let cap = Swift.max(1, Swift.min(max, 64))
        var msgs = [uffd_msg](repeating: uffd_msg(), count: cap)
        let n = msgs.withUnsafeMutableBufferPointer { cuffd_read_msgs(fd, $0.baseAddress, cap) }
        guard n >= 0 else { throw UffdError(.faultLoop, rc: Int32(n)) }
        return (0..<Int(n)).map { Message(msgs[$0], features: features, userModeOnly: userModeOnly) }
    }

    /// Waits up to `timeoutMilliseconds` (-1: forever) for a message; true when one is queued.
    public func waitReadable(timeoutMilliseconds: Int32) -> Bool {
        cuffd_wait_readable(fd, timeoutMilliseconds) == 1
    }
}

/// The base page size.
public var basePageSize: Int { Int(cuffd_page_size()) }

/// The default huge page size (hugetlb), or nil when the kernel reports none.
public var hugePageSize: Int? {
    let s = cuffd_hugepage_size()
    return s == 0 ? nil : Int(s)
}

@inline(__always)
func hex(_ v: UInt) -> String { "0x" + String(v, radix: 16) }
