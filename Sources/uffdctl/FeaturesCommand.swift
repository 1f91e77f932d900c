import ArgumentParser
import Foundation
import UffdKit

/// `uffdctl features`: what this kernel offers and who may use it here.
struct FeaturesCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "features",
        abstract: "Kernel release, UFFD API, every feature bit and ioctl, and who may use userfaultfd here.",
        discussion: """
            Probes the kernel with UFFDIO_API on a throwaway fd, registers a small region of each \
            memory type to list the per-range ioctls, and reads the settings that decide access: \
            vm.unprivileged_userfaultfd, /dev/userfaultfd, THP and huge page state. Ends with \
            verdicts and, where something is not allowed, the exact fix. Exits 3 when this user \
            cannot open a userfaultfd at all.
            """ + exitCodesHelp
    )

    @Flag(help: "Print one JSON object on stdout.")
    var json = false

    @Flag(help: "Accepted for symmetry with the session commands; features prints no progress.")
    var quiet = false

    func run() throws {
        let report = FeatureReport.gather()
        if json {
            print(try report.jsonString())
        } else {
            print(report.text())
        }
        if !report.environment.userModeFaults.allowed {
            throw CLIError.notAllowed(
                "this user cannot open a userfaultfd (\(report.environment.userModeFaults.detail))",
                fix: report.environment.userModeFaults.fix ?? "see the verdicts above")
        }
    }
}

/// Everything `features` reports, Codable for --json.
struct FeatureReport: Codable {
    struct Feature: Codable {
        var name: String
        var bit: Int
        var supported: Bool
    }
    struct Access: Codable {
        var allowed: Bool
        /// "syscall", "/dev/userfaultfd", or the refusal.
        var detail: String
        var fix: String?
    }
    struct DeviceInfo: Codable {
        var present: Bool
        var mode: String?
        var owner: String?
        var accessibleByThisUser: Bool
    }
    struct Environment: Codable {
        var uid: UInt32
        var unprivilegedUserfaultfd: Int?
        var device: DeviceInfo
        var userModeFaults: Access
        var kernelFaults: Access
        var thp: String?
        var shmemThp: String?
        var hugePageSizeKiB: UInt64
        var hugePagesTotal: Int?
        var hugePagesFree: Int?
    }
    var kernel: String
    var api: Int
    var probeError: String?
    var features: [Feature]
    var unknownFeatureBits: [Int]
    var ioctls: [String]
    /// Per memory type: the ioctls of a range registered for every mode that memory takes.
    var rangeIoctls: [String: [String]]
    /// Per memory type: the modes of that probe registration.
    var rangeModes: [String: String]
    /// Per memory type whose probe failed: why (e.g. hugetlb with no free huge pages).
    var rangeProbeErrors: [String: String]
    var environment: Environment
    var verdicts: [String]

    static func gather() -> FeatureReport {
        var uts = utsname()
        uname(&uts)
        let release = withUnsafeBytes(of: &uts.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }

        let probe: FeatureProbe?
        var probeError: String?
        do {
            probe = try FeatureProbe()
        } catch {
            probe = nil
            probeError = "UFFDIO_API probe failed: \(errnoName(error.errno.rawValue))"
        }
        let offered = probe?.features ?? []
        let features = Features.known.bits.map { bit in
            let f = Features(rawValue: 1 << UInt64(bit))
            return Feature(name: f.names.first ?? "bit \(bit)", bit: bit, supported: offered.contains(f))
        }
        var ranges: [String: [String]] = [:], modes: [String: String] = [:], errors: [String: String] = [:]
        if let probe {
            for memory in MemoryType.allCases {
                let m = FeatureProbe.modes(for: memory.kind)
                do {
                    ranges[memory.rawValue] = try probe.rangeIoctls(memory.kind, modes: m).names
                    modes[memory.rawValue] = m.description
                } catch {
                    errors[memory.rawValue] = "\(error)"
                }
            }
        }
        let env = Environment.gather()
        var report = FeatureReport(
            kernel: release,
            api: probe == nil ? 0 : FeatureProbe.apiVersion,
            probeError: probeError,
            features: features,
            unknownFeatureBits: offered.subtracting(.known).bits,
            ioctls: probe?.ioctls.names ?? [],
            rangeIoctls: ranges,
            rangeModes: modes,
            rangeProbeErrors: errors,
            environment: env,
            verdicts: []
        )
        report.verdicts = report.makeVerdicts()
        return report
    }

    func jsonString() throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        encoder.keyEncodingStrategy = .convertToSnakeCase
        return String(decoding: try encoder.encode(self), as: UTF8.self)
    }

    func text() -> String {
        var out = "kernel            \(kernel)\n"
        out += "UFFD API          \(api == 0 ? "unavailable" : String(format: "0x%X", api))"
        if let probeError { out += " (\(probeError))" }
        out += "\n\nfeatures\n"
        for f in features {
            out += "  \(f.supported ? "yes" : " no")  \(String(format: "%2d", f.bit))  \(f.name)\n"
        }
        if !unknownFeatureBits.isEmpty {
            out += "  unknown bits offered by this kernel: \(unknownFeatureBits.map(String.init).joined(separator: ", "))\n"
        }
        out += "\nioctls (fd)       \(ioctls.joined(separator: " "))\n"
        for memory in MemoryType.allCases.map(\.rawValue) {
            out += "ioctls (\(memory))".padding(toLength: 24, withPad: " ", startingAt: 0)
            if let names = rangeIoctls[memory] {
                out += names.joined(separator: " ") + "  (range registered \(rangeModes[memory] ?? "?"))\n"
            } else {
                out += "not probed: \(rangeProbeErrors[memory] ?? "no userfaultfd")\n"
            }
        }
        let e = environment
        out += "\nenvironment\n"
        out += "  uid                           \(e.uid)\n"
        out += "  vm.unprivileged_userfaultfd   \(e.unprivilegedUserfaultfd.map(String.init) ?? "unknown")\n"
        if e.device.present {
            out += "  /dev/userfaultfd              \(e.device.mode ?? "?") \(e.device.owner ?? "?"), \(e.device.accessibleByThisUser ? "usable" : "not usable") by this user\n"
        } else {
            out += "  /dev/userfaultfd              absent\n"
        }
        out += "  user-mode faults              \(e.userModeFaults.allowed ? "allowed" : "NOT allowed") (\(e.userModeFaults.detail))\n"
        out += "  kernel faults                 \(e.kernelFaults.allowed ? "allowed" : "NOT allowed") (\(e.kernelFaults.detail))\n"
        out += "  THP                           \(e.thp ?? "unknown")\n"
        out += "  shmem THP                     \(e.shmemThp ?? "unknown")\n"
        out += "  huge pages                    \(e.hugePagesFree.map(String.init) ?? "?") free of \(e.hugePagesTotal.map(String.init) ?? "?") (\(e.hugePageSizeKiB) KiB)\n"
        out += "\nverdicts\n"
        for v in verdicts { out += "  - \(v)\n" }
        return out
    }

    func makeVerdicts() -> [String] {
        var v: [String] = []
        let e = environment
        if e.userModeFaults.allowed {
            v.append("userfaultfd for user-mode faults: allowed (\(e.userModeFaults.detail)).")
        } else {
            v.append("userfaultfd: NOT allowed for this user. Fix: \(e.userModeFaults.fix ?? "run as root").")
        }
        if e.kernelFaults.allowed {
            v.append("kernel-mode faults (syscalls touching registered memory block instead of failing): allowed.")
        } else {
            v.append("kernel-mode faults: NOT allowed (only matters when you opt in). Fix: \(e.kernelFaults.fix ?? "run as root").")
        }
        if e.uid != 0 {
            v.append("fork events (EVENT_FORK, used by `uffdctl poison`) need CAP_SYS_PTRACE; without it those sessions exit 3.")
        }
        let supported = Set(features.filter(\.supported).map(\.name))
        for (name, what) in [("MOVE", "UFFDIO_MOVE (zero-copy page moves)"), ("POISON", "UFFDIO_POISON"),
                             ("WP_ASYNC", "async write-protect dirty tracking (PAGEMAP_SCAN)"),
                             ("MINOR_SHMEM", "shmem minor faults (UFFDIO_CONTINUE)")] {
            v.append("\(what): \(supported.contains(name) ? "available" : "not offered by this kernel (needs a newer kernel)").")
        }
        if (e.hugePagesFree ?? 0) > 0 {
            v.append("hugetlb sessions: \(e.hugePagesFree ?? 0) huge pages free.")
        } else {
            v.append("hugetlb sessions: no free huge pages. Fix (root): echo 64 > /proc/sys/vm/nr_hugepages")
        }
        if e.thp == "never" {
            v.append("THP is off: 2 MiB MOVE benchmarks fall back to 4 KiB pages. Fix (root): echo madvise > /sys/kernel/mm/transparent_hugepage/enabled")
        }
        return v
    }
}

extension FeatureReport.Environment {
    static func gather() -> Self {
        let uid = getuid()
        let unpriv = readFile("/proc/sys/vm/unprivileged_userfaultfd").flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        var st = stat()
        let present = stat("/dev/userfaultfd", &st) == 0
        let device = FeatureReport.DeviceInfo(
            present: present,
            mode: present ? String(format: "%04o", st.st_mode & 0o7777) : nil,
            owner: present ? "\(userName(st.st_uid)):\(groupName(st.st_gid))" : nil,
            accessibleByThisUser: present && access("/dev/userfaultfd", R_OK | W_OK) == 0
        )
        let fixUser = uid == 0 ? "userfaultfd is not built into this kernel (CONFIG_USERFAULTFD)"
            : "sysctl -w vm.unprivileged_userfaultfd=1, or give this user read/write on /dev/userfaultfd (e.g. chgrp GROUP /dev/userfaultfd && chmod 0660 /dev/userfaultfd), or run as root"
        let fixKernel = uid == 0 ? "userfaultfd is not built into this kernel"
            : "sysctl -w vm.unprivileged_userfaultfd=1, or read/write access to /dev/userfaultfd, or CAP_SYS_PTRACE"
        return .init(
            uid: uid,
            unprivilegedUserfaultfd: unpriv,
            device: device,
            userModeFaults: tryOpen([], fix: fixUser),
            kernelFaults: tryOpen(.kernelFaults, fix: fixKernel),
            thp: bracketed(readFile("/sys/kernel/mm/transparent_hugepage/enabled")),
            shmemThp: bracketed(readFile("/sys/kernel/mm/transparent_hugepage/shmem_enabled")),
            hugePageSizeKiB: UInt64(UffdKit.hugePageSize ?? 0) / 1024,
            hugePagesTotal: meminfo("HugePages_Total"),
            hugePagesFree: meminfo("HugePages_Free")
        )
    }

    /// Opens (and closes) a userfaultfd with `options`: who may, and through which path.
    private static func tryOpen(_ options: Userfaultfd.Options, fix: String) -> FeatureReport.Access {
        do {
            let uffd = try Userfaultfd(features: [], options: options)
            return .init(allowed: true, detail: uffd.openedThroughDevice ? "/dev/userfaultfd" : "syscall", fix: nil)
        } catch {
            return .init(allowed: false, detail: "refused: \(errnoName(error.errno.rawValue))", fix: fix)
        }
    }
}

/// "EPERM (Operation not permitted)" for an errno value.
func errnoName(_ code: Int32) -> String {
    let names: [Int32: String] = [
        EPERM: "EPERM", ENOENT: "ENOENT", ESRCH: "ESRCH", EINTR: "EINTR", EIO: "EIO", EBADF: "EBADF",
        EAGAIN: "EAGAIN", ENOMEM: "ENOMEM", EACCES: "EACCES", EFAULT: "EFAULT", EBUSY: "EBUSY",
        EEXIST: "EEXIST", EINVAL: "EINVAL", ENOSYS: "ENOSYS", ENOTTY: "ENOTTY", EOPNOTSUPP: "EOPNOTSUPP",
    ]
    return "\(names[code] ?? "errno \(code)") (\(String(cString: strerror(code))))"
}

private func readFile(_ path: String) -> String? {
    try? String(contentsOfFile: path, encoding: .utf8)
}

/// "always [madvise] never" -> "madvise".
private func bracketed(_ text: String?) -> String? {
    guard let text, let open = text.firstIndex(of: "["), let close = text.firstIndex(of: "]"), open < close else {
        return text?.trimmingCharacters(in: .whitespacesAndNewlines)
    }
    return String(text[text.index(after: open)..<close])
}

private func meminfo(_ key: String) -> Int? {
    guard let text = readFile("/proc/meminfo") else { return nil }
    for line in text.split(separator: "\n") where line.hasPrefix(key + ":") {
        return Int(line.dropFirst(key.count + 1).trimmingCharacters(in: .whitespaces).split(separator: " ").first ?? "")
    }
    return nil
}

private func userName(_ uid: uid_t) -> String {
    guard let pw = getpwuid(uid) else { return String(uid) }
    return String(cString: pw.pointee.pw_name)
}

private func groupName(_ gid: gid_t) -> String {
    guard let gr = getgrgid(gid) else { return String(gid) }
    return String(cString: gr.pointee.gr_name)
}
