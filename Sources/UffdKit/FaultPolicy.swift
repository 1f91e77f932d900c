import CUffd
import SystemPackage

/// What the fault loop does for one fault: an operation on a page-aligned range.
///
/// A resolution may cover more than the faulting page (readahead), as long as the range stays
/// inside the registered memory. A `length` of 0 means "the faulting base page".
public struct Resolution: Sendable, Hashable {
    /// The ioctl the loop performs.
    public enum Operation: UInt32, Sendable, Hashable, CaseIterable, CustomStringConvertible {
        /// Nothing: the policy resolved (or deliberately ignored) the fault itself.
        case none = 0
        /// UFFDIO_COPY from ``Resolution/source``.
        case copy
        /// UFFDIO_ZEROPAGE.
        case zeropage
        /// UFFDIO_MOVE from ``Resolution/source``.
        case move
        /// UFFDIO_CONTINUE (minor faults).
        case `continue`
        /// UFFDIO_WRITEPROTECT clear (write-protect faults).
        case unprotect
        /// UFFDIO_WAKE only: the thread retries the access.
        case wake
        /// UFFDIO_POISON: the thread gets SIGBUS.
        case poison
        /// The policy could not resolve: the handler's fallback applies.
        case fail
        /// Not yet: the policy claimed the range with ``FaultContext/deferFill(_:length:pageSize:)``
        /// and its bytes are on their way (`CUFFD_OP_DEFER`).
        case deferred

        /// The operation's name.
        public var description: String {
            switch self {
            case .none: "none"
            case .copy: "copy"
            case .zeropage: "zeropage"
            case .move: "move"
            case .continue: "continue"
            case .unprotect: "unprotect"
            case .wake: "wake"
            case .poison: "poison"
            case .fail: "fail"
            case .deferred: "deferred"
            }
        }
    }

    /// The operation.
    public var operation: Operation
    /// Start of the range (page-aligned); ignored when `length` is 0.
    public var start: UInt
    /// Bytes in the range; 0 means the faulting base page.
    public var length: Int
    /// COPY: address of the source bytes; MOVE: address of the donor pages.
    public var source: UInt
    /// Extra mode bits for the ioctl (e.g. `UFFDIO_COPY_MODE_WP`); wake bits are managed by the loop.
    public var mode: UInt64

    /// Creates a resolution.
    @inlinable
    public init(_ operation: Operation, start: UInt = 0, length: Int = 0, source: UInt = 0, mode: UInt64 = 0) {
        self.operation = operation
        self.start = start
        self.length = length
        self.source = source
        self.mode = mode
    }

    /// Copy `length` bytes from `source` to `start`.
    @inlinable
    public static func copy(from source: UInt, to start: UInt, length: Int, writeProtected: Bool = false) -> Resolution {
        Resolution(.copy, start: start, length: length, source: source,
                   mode: writeProtected ? UInt64(UFFDIO_COPY_MODE_WP) : 0)
    }

    /// Map zero pages on `[start, start+length)` (0: the faulting page).
    @inlinable
    public static func zeropage(_ start: UInt = 0, length: Int = 0) -> Resolution {
        Resolution(.zeropage, start: start, length: length)
    }

    /// Move the pages at `source` (exclusive to this process) to `start`.
    @inlinable
    public static func move(from source: UInt, to start: UInt, length: Int) -> Resolution {
        Resolution(.move, start: start, length: length, source: source)
    }

    /// Map the page-cache pages of `[start, start+length)` (minor faults).
    @inlinable
    public static func `continue`(_ start: UInt = 0, length: Int = 0) -> Resolution {
        Resolution(.continue, start: start, length: length)
    }

    /// Clear write protection on `[start, start+length)` and wake.
    @inlinable
    public static func unprotect(_ start: UInt = 0, length: Int = 0) -> Resolution {
        Resolution(.unprotect, start: start, length: length)
    }

    /// Only wake the waiters: they retry the access.
    @inlinable
    public static func wake(_ start: UInt = 0, length: Int = 0) -> Resolution {
        Resolution(.wake, start: start, length: length)
    }

    /// Poison `[start, start+length)`: accesses raise SIGBUS.
    @inlinable
    public static func poison(_ start: UInt = 0, length: Int = 0) -> Resolution {
        Resolution(.poison, start: start, length: length)
    }

    /// Nothing to do (the policy resolved the fault itself).
    public static let none = Resolution(.none)

    /// Let the handler's fallback resolve the fault.
    public static let fail = Resolution(.fail)

    /// Not yet: the fault waits for the fetch claimed by ``FaultContext/deferFill(_:length:pageSize:)``.
    public static let deferred = Resolution(.deferred)
}

/// What a policy sees besides the fault: the reader thread it runs on and its scratch memory.
///
/// One context exists per reader thread and is never shared between threads. ``scratch`` is
/// private to the fault being decided and stays valid until the batch's resolutions have been
/// performed, so a COPY may read its source bytes from there.
public struct FaultContext: @unchecked Sendable {
    /// The userfaultfd the fault came from.
    public let fd: Int32
    /// The features enabled on that fd.
    public let features: Features
    /// The reader thread's index (0 ..< readers; -1 where no reader calls, see ``FaultPolicy/failed(_:resolution:errno:context:)``).
    public let reader: Int
    /// The index of the fault within the current batch (0 ..< batch size).
    public internal(set) var batchIndex: Int
    /// The reader's scratch memory: `scratchSlotSize` bytes per batch slot.
    @usableFromInline let scratchBase: UnsafeMutableRawPointer?
    /// Bytes of scratch per batch slot (the largest ``FaultPolicy/scratchBytes`` asked for).
    public let scratchSlotSize: Int
    /// The handler run's table of deferred fetches (nil outside a handler). Unowned: the
    /// reader that made this context keeps the table alive while it decides.
    unowned(unsafe) var deferredTable: DeferredTable? = nil
    /// The message being decided (set per fault by the reader; what ``deferFill(_:length:pageSize:)`` claims for).
    var message: UnsafePointer<uffd_msg>? = nil

    /// Scratch memory private to this fault: valid until the batch's resolutions were performed.
    /// Its size is ``scratchSlotSize`` (the policy's ``FaultPolicy/scratchBytes``), page-aligned.
    @inlinable
    public var scratch: UnsafeMutableRawPointer? {
        scratchBase.map { $0 + batchIndex * scratchSlotSize }
    }

    /// Creates a context (for calling a policy outside a handler, e.g. in a custom loop).
    public init(fd: Int32, features: Features, reader: Int = 0, scratch: UnsafeMutableRawPointer? = nil, scratchSize: Int = 0) {
        self.fd = fd
        self.features = features
        self.reader = reader
        self.batchIndex = 0
        self.scratchBase = scratch
        self.scratchSlotSize = scratchSize
    }

    init(fd: Int32, features: Features, reader: Int, scratchBase: UnsafeMutableRawPointer?, slotSize: Int) {
        self.fd = fd
        self.features = features
        self.reader = reader
        self.batchIndex = 0
        self.scratchBase = scratchBase
        self.scratchSlotSize = slotSize
    }
}

/// Decides how faults are resolved. Called on the handler's reader threads (several at once
/// when there are several readers), once per fault, with no lock held: implementations must
/// be thread-safe and should not allocate or block on the fault path.
///
/// Errors: a policy that throws (or returns ``Resolution/fail``) gets the handler's fallback
/// (by default the page is poisoned and the faulting thread receives SIGBUS), and the error is
/// delivered to the handler's owner (``FaultHandler/failures()`` and ``FaultHandler/Options/onFailure``).
/// A failing ioctl is treated the same way. No faulting thread is left blocked.
public protocol FaultPolicy: Sendable {
    /// Decides the resolution of `fault`.
    func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution

    /// Sees an event in order with the faults (fork, remap, remove, unmap), to keep
    /// bookkeeping right. Default: nothing.
    func handle(event: Event, context: borrowing FaultContext)

    /// Scratch bytes needed per fault (e.g. the largest range read from a file). Default 0.
    var scratchBytes: Int { get }

    /// Learns that the resolution this policy returned for `fault` did not happen: its ioctl
    /// failed with `errno` (or the policy threw; `resolution` is then ``Resolution/fail``) and
    /// the handler's fallback took over. Called on the reader thread after the batch, before
    /// that reader decides another fault; not on the fast path (only failures are reported).
    /// Deferred fetches get it too: one that missed its deadline on the reader (`resolution` is
    /// ``Resolution/deferred``, errno ETIMEDOUT); one the source failed on the thread that
    /// failed it (`resolution` is ``Resolution/fail`` over the range; `context.reader` is -1 and there is no
    /// scratch). On a reader it should not allocate (see ``FaultHandler``'s notes on fork).
    /// A policy that marks state when it decides (a granule "moving") must undo it here, so a
    /// failure never blocks the page for good. Also called, with no fallback and no failure
    /// report, when the ioctl (errno EAGAIN) or its fallback (errno the ioctl's) met EAGAIN: an
    /// event is pending, and the fault is decided again once the events are read. Default: nothing.
    func failed(_ fault: Fault, resolution: Resolution, errno: Errno, context: borrowing FaultContext)

    /// The policy serving a forked child's faults (``FaultHandler/ForkHandling/serveWithSamePolicy``):
    /// the child is another address space, so a policy with per-address-space state (which pages
    /// were served, where the range was remapped) returns a policy of its own for it. Default: `self`.
    func forkedChild() -> any FaultPolicy
}

extension FaultPolicy {
    /// Ignores the event.
    public func handle(event: Event, context: borrowing FaultContext) {}
    /// No scratch memory.
    public var scratchBytes: Int { 0 }
    /// Nothing to undo.
    public func failed(_ fault: Fault, resolution: Resolution, errno: Errno, context: borrowing FaultContext) {}
    /// The same policy.
    public func forkedChild() -> any FaultPolicy { self }
}
