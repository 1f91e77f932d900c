import Foundation
import UffdKit

/// Turns a library error into the CLI's exit codes: permissions and missing kernel features
/// are 3 (with the fix), memory the machine cannot map is 2, the rest is 1.
func cliError(_ e: UffdError, memory: MemoryType? = nil, what: String) -> CLIError {
    switch (e.operation, e.errno) {
    case (.open, .notPermitted), (.open, .permissionDenied), (.open, .noFunction):
        return .notAllowed("\(what): \(e)", fix: e.explanation)
    case (.api, .notPermitted):
        return .notAllowed("\(what): the kernel refused the requested features (EPERM): \(e.detail)",
                           fix: "EVENT_FORK needs CAP_SYS_PTRACE: run as root or grant it (e.g. setcap cap_sys_ptrace+ep uffdctl)")
    case (.api, _):
        return .notAllowed("\(what): \(e)", fix: "this kernel lacks the feature; see `uffdctl features` (a newer kernel offers it)")
    case (.map, .noMemory) where memory?.isHugetlb == true, (.map, .invalidArgument) where memory?.isHugetlb == true:
        let total = meminfoValue("HugePages_Total") ?? 0
        return .notAllowed("\(what): cannot map hugetlb memory (\(e.errno))",
                           fix: "reserve huge pages as root: echo \(total + 64) > /proc/sys/vm/nr_hugepages")
    case (.map, .noMemory):
        return .usage("\(what): the machine cannot map this size (\(e.errno)); use a smaller --size")
    case (.map, _), (.argument, _):
        return .usage("\(what): \(e)")
    default:
        return .failed("\(what): \(e)")
    }
}

/// The UffdKit steps every session shares, with the CLI's error mapping.
enum SessionSteps {
    /// Maps `length` bytes of `memory`.
    static func map(_ memory: MemoryType, length: Int, thpAligned: Bool = false) throws(CLIError) -> MappedRegion {
        do {
            let kind: MappedRegion.Kind = memory == .anon ? .anonymous(thpAligned: thpAligned) : memory.kind
            return try MappedRegion(kind, length: length)
        } catch {
            throw cliError(error, memory: memory, what: "mapping \(formatBytes(length)) of \(memory.rawValue) memory")
        }
    }

    /// The features `memory` needs for `mode` faults.
    static func memoryFeatures(_ memory: MemoryType, minor: Bool = false) -> Features {
        switch memory {
        case .anon: return []
        case .shmem, .shmemPrivate: return minor ? .minorShmem : .missingShmem
        case .hugetlb, .hugetlbPrivate: return minor ? .minorHugetlbfs : .missingHugetlbfs
        }
    }

    /// Opens a userfaultfd with `features`; exit 3 when the kernel or permissions refuse.
    static func open(features: Features) throws(CLIError) -> Userfaultfd {
        let offered: Features
        do {
            offered = try Userfaultfd.probe()
        } catch {
            throw cliError(error, what: "probing userfaultfd")
        }
        let missing = Features(rawValue: features.rawValue & ~offered.rawValue)
        if !missing.isEmpty {
            throw .notAllowed("this kernel does not offer \(missing.names.joined(separator: ", "))",
                              fix: "use a kernel that offers it (see `uffdctl features`)")
        }
        do {
            return try Userfaultfd(features: features)
        } catch {
            throw cliError(error, what: "opening a userfaultfd")
        }
    }

    /// Registers the region and checks that the range offers `needed`.
    static func register(_ uffd: Userfaultfd, _ region: MappedRegion, modes: RegisterMode, needed: Ioctls,
                         memory: MemoryType) throws(CLIError) {
        let ioctls: Ioctls
        do {
            ioctls = try uffd.register(region, modes: modes)
        } catch {
            if error.errno == .invalidArgument {
                throw .notAllowed("registering \(memory.rawValue) memory for \(modes): \(error)",
                                  fix: "this memory type does not support that mode here; try --memory anon or shmem")
            }
            throw cliError(error, memory: memory, what: "registering the region")
        }
        let missing = Ioctls(rawValue: needed.rawValue & ~ioctls.rawValue)
        if !missing.isEmpty {
            throw .notAllowed("the kernel does not offer \(missing.names.joined(separator: ", ")) on \(memory.rawValue) memory (range offers \(ioctls.names.joined(separator: " ")))",
                              fix: "use a memory type that supports it (e.g. --memory anon)")
        }
    }

    /// Starts a handler with `readers` threads.
    static func startHandler(_ uffd: Userfaultfd, policy: any FaultPolicy, readers: Int, pin: Int32? = nil) throws(CLIError) -> FaultHandler {
        var o = FaultHandler.Options()
        o.readers = readers
        o.cpus = pin.map { [Int($0)] }
        // A fault the policy or its ioctl cannot resolve gets a zero page (or is unprotected /
        // continued) instead of SIGBUS: the worker goes on, verification fails, the session
        // reports the failure and exits 1 instead of dying.
        o.fallback = .zeroFill
        o.threadName = "uffdctl-reader"
        let h = FaultHandler(uffd: uffd, policy: policy, options: o)
        do {
            try h.start()
        } catch {
            throw cliError(error, what: "starting the fault handler")
        }
        return h
    }
}

/// The actions of a plain workload: every page read or written.
func uniformActions(pages: Int, write: Bool) -> [PageAction] {
    [PageAction](repeating: write ? .write : .read, count: pages)
}
