import CUffd

/// A page fault read from a userfaultfd.
public struct Fault: Sendable, Hashable {
    /// Why the thread faulted.
    public enum Kind: Sendable, Hashable {
        /// The page is not populated (MISSING mode).
        case missing
        /// A write to a write-protected page (WP mode).
        case writeProtect
        /// The page is in the page cache but not mapped (MINOR mode, shmem/hugetlb).
        case minor
    }

    /// The faulting address rounded down to the base page.
    public let address: UInt
    /// The exact faulting address, when EXACT_ADDRESS was granted; nil otherwise.
    public let exactAddress: UInt?
    /// The kind of fault.
    public let kind: Kind
    /// Whether the access was a write.
    public let isWrite: Bool
    /// The faulting thread's id, when THREAD_ID was granted; 0 otherwise.
    public let threadID: Int32

    /// Creates a fault (for tests and custom loops).
    public init(address: UInt, exactAddress: UInt? = nil, kind: Kind, isWrite: Bool, threadID: Int32 = 0) {
        self.address = address
        self.exactAddress = exactAddress
        self.kind = kind
        self.isWrite = isWrite
        self.threadID = threadID
    }

    /// Decodes a pagefault message. `pageMask` is `~(pageSize - 1)`.
    @inline(__always)
    init(_ m: borrowing uffd_msg, pageMask: UInt, exact: Bool, threadIDs: Bool) {
        let raw = UInt(m.arg.pagefault.address)
        let flags = m.arg.pagefault.flags
        address = raw & pageMask
        exactAddress = exact ? raw : nil
        if flags & UInt64(UFFD_PAGEFAULT_FLAG_WP) != 0 {
            kind = .writeProtect
        } else if flags & UInt64(UFFD_PAGEFAULT_FLAG_MINOR) != 0 {
            kind = .minor
        } else {
            kind = .missing
        }
        isWrite = flags & UInt64(UFFD_PAGEFAULT_FLAG_WRITE) != 0
        threadID = threadIDs ? Int32(bitPattern: m.arg.pagefault.feat.ptid) : 0
    }
}

/// A non-cooperative event: the address space of the registered memory changed.
public enum Event: Sendable {
    /// The process forked; the child's memory is registered with `child` (retain it to keep
    /// handling the child's faults; when released, the fd is closed and the child's faults
    /// resolve normally).
    case fork(child: Userfaultfd)
    /// `mremap` moved `[from, from+length)` to `to`.
    case remap(from: UInt, to: UInt, length: Int)
    /// `MADV_DONTNEED`/`MADV_REMOVE` dropped `[start, end)`: the pages fault again.
    case remove(start: UInt, end: UInt)
    /// `munmap` removed `[start, end)` from the registered memory.
    case unmap(start: UInt, end: UInt)
    /// An event this library does not know (its raw `UFFD_EVENT_*` number).
    case unknown(UInt8)
}

/// One message read from a userfaultfd: a fault or an event.
public enum Message: Sendable {
    /// A page fault.
    case fault(Fault)
    /// An address-space event.
    case event(Event)

    /// Decodes a raw message; a fork event adopts the child's fd.
    init(_ m: uffd_msg, features: Features, userModeOnly: Bool) {
        switch Int32(m.event) {
        case Int32(UFFD_EVENT_PAGEFAULT):
            self = .fault(Fault(m, pageMask: ~(UInt(basePageSize) - 1),
                                exact: features.contains(.exactAddress),
                                threadIDs: features.contains(.threadID)))
        default:
            self = .event(Event(m, features: features, userModeOnly: userModeOnly))
        }
    }
}

extension Event {
    /// Decodes an event message. A fork event's child fd is owned by the returned value.
    /// `userModeOnly`: the parent fd's; the kernel gives the child's fd the parent's flags.
    init(_ m: uffd_msg, features: Features, userModeOnly: Bool) {
        switch Int32(m.event) {
        case Int32(UFFD_EVENT_FORK):
            self = .fork(child: Userfaultfd(adopting: Int32(bitPattern: m.arg.fork.ufd), features: features,
                                            userModeOnly: userModeOnly))
        case Int32(UFFD_EVENT_REMAP):
            self = .remap(from: UInt(m.arg.remap.from), to: UInt(m.arg.remap.to), length: Int(m.arg.remap.len))
        case Int32(UFFD_EVENT_REMOVE):
            self = .remove(start: UInt(m.arg.remove.start), end: UInt(m.arg.remove.end))
        case Int32(UFFD_EVENT_UNMAP):
            self = .unmap(start: UInt(m.arg.remove.start), end: UInt(m.arg.remove.end))
        default:
            self = .unknown(m.event)
        }
    }
}
