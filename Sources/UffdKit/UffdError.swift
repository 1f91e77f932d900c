import CUffd
import SystemPackage

/// The one error type of UffdKit: which operation failed, the errno, how many bytes were
/// done before the failure, and what a person can do about it.
public struct UffdError: Error, Sendable, CustomStringConvertible {
    /// The operation that failed.
    public enum Operation: String, Sendable {
        /// Opening a userfaultfd (userfaultfd(2) or /dev/userfaultfd).
        case open
        /// The UFFDIO_API handshake.
        case api
        /// UFFDIO_REGISTER.
        case register
        /// UFFDIO_UNREGISTER.
        case unregister
        /// UFFDIO_COPY.
        case copy
        /// UFFDIO_ZEROPAGE.
        case zeropage
        /// UFFDIO_MOVE.
        case move
        /// UFFDIO_CONTINUE.
        case `continue`
        /// UFFDIO_WRITEPROTECT (protect).
        case writeProtect
        /// UFFDIO_WRITEPROTECT (unprotect).
        case unprotect
        /// UFFDIO_WAKE.
        case wake
        /// UFFDIO_POISON.
        case poison
        /// Mapping memory (mmap, memfd).
        case map
        /// PAGEMAP_SCAN.
        case pagemapScan
        /// Reading or generating page contents (a page source).
        case source
        /// Starting the handler's threads or stop fd.
        case handler
        /// The fault loop itself (poll/read on the fd).
        case faultLoop
        /// Bad input from the caller.
        case argument
    }

    /// The operation that failed.
    public let operation: Operation
    /// The errno the kernel (or the library) reported.
    public let errno: Errno
    /// Bytes completed before the failure (partial progress of a resolve verb).
    public let bytesDone: Int
    /// Extra context (the range, the fd, the file), may be empty.
    public let detail: String

    /// Creates an error; `detail` adds context such as the range.
    public init(_ operation: Operation, _ errno: Errno, bytesDone: Int = 0, detail: String = "") {
        self.operation = operation
        self.errno = errno
        self.bytesDone = bytesDone
        self.detail = detail
    }

    /// Creates an error from a C core return value (`-errno`).
    init(_ operation: Operation, rc: Int32, bytesDone: Int64 = 0, detail: String = "") {
        self.init(operation, Errno(rawValue: -rc), bytesDone: Int(bytesDone), detail: detail)
    }

    /// What the failure means and what to do about it.
    public var explanation: String {
        switch (operation, errno) {
        case (.open, .notPermitted), (.open, .permissionDenied):
            return "the kernel refused a userfaultfd: allow unprivileged use with "
                + "`sysctl vm.unprivileged_userfaultfd=1`, or give this user read/write access to "
                + "/dev/userfaultfd, or open with user-mode-only faults (the default) and without "
                + "kernel-fault handling; CAP_SYS_PTRACE also lifts the restriction"
        case (.open, .noFunction):
            return "this kernel has no userfaultfd (CONFIG_USERFAULTFD is off)"
        case (.open, .invalidArgument):
            return "the kernel does not know the open flags (user-mode-only needs Linux 5.11)"
        case (.api, .invalidArgument):
            return "UFFDIO_API refused the request: a requested feature is not offered "
                + "(check Userfaultfd.probe()), or the API handshake was already done on this fd"
        case (.register, .invalidArgument):
            return "the range is misaligned (start and length must be multiples of the page "
                + "size, the huge page size for hugetlb) or the memory or mode is unsupported "
                + "(minor mode needs shmem/hugetlb, write-protect needs the WP feature)"
        case (.register, .noMemory):
            return "no mapping covers the whole range"
        case (.register, .resourceBusy):
            return "the range is already registered with another userfaultfd"
        case (_, .fileExists):
            return "the page is already populated (someone else resolved it): wake the waiter "
                + "and count it as done"
        case (.move, .resourceBusy):
            return "UFFDIO_MOVE needs source pages exclusive to this process (not shared after "
                + "fork or by KSM): keep donor pages in a MADV_DONTFORK mapping"
        case (.move, .noSuchFileOrDirectory):
            return "the MOVE source has a hole (the donor page was already moved or never populated)"
        case (_, .noSuchFileOrDirectory):
            return "no mapping covers the range any more (it was unmapped)"
        case (_, .noSuchProcess):
            return "the process that owns the memory is gone"
        case (_, .resourceTemporarilyUnavailable):
            return "the address space is changing (an event is pending): read events and retry"
        case (_, .invalidArgument):
            return "the range is misaligned, not registered, or the mode is not supported"
        case (_, .noMemory):
            return "the kernel could not allocate memory"
        case (_, .badAddress):
            return "a source or destination address is not accessible"
        case (.source, _):
            return "the page source could not provide the bytes"
        default:
            return String(cString: strerror(errno.rawValue))
        }
    }

    /// `operation failed: errno (bytes done): explanation [detail]`.
    public var description: String {
        var s = "\(operation.rawValue) failed: \(errno)"
        if bytesDone > 0 { s += " after \(bytesDone) bytes" }
        if !detail.isEmpty { s += " (\(detail))" }
        return s + ": " + explanation
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
