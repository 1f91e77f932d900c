import CUffd
import Foundation
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The credentials of the process at the other end of a Unix socket (SO_PEERCRED, taken when
/// it connected).
public struct PeerCredentials: Sendable, Hashable, Codable, CustomStringConvertible {
    /// Its pid (0 when it lives in another pid namespace).
    public var pid: Int32
    /// Its effective uid.
    public var uid: UInt32
    /// Its effective gid.
    public var gid: UInt32

    /// Credentials from their values.
    public init(pid: Int32, uid: UInt32, gid: UInt32) {
        self.pid = pid
        self.uid = uid
        self.gid = gid
    }

    /// `pid=1234 uid=0 gid=0`.
    public var description: String { "pid=\(pid) uid=\(uid) gid=\(gid)" }
}

/// A uffd received from another process, with the regions it serves and who sent it.
public struct ReceivedHandoff: Sendable {
    /// The adopted userfaultfd (this process owns it now).
    public let uffd: Userfaultfd
    /// The regions, in the order sent.
    public let regions: [GuestRegion]
    /// The sender.
    public let peer: PeerCredentials
    /// The body as received.
    public let body: [UInt8]

    /// A hand-off from parts (e.g. state inherited across a restart of the server).
    public init(uffd: Userfaultfd, regions: [GuestRegion], peer: PeerCredentials, body: [UInt8] = []) {
        self.uffd = uffd
        self.regions = regions
        self.peer = peer
        self.body = body
    }
}

/// Hand-off of a userfaultfd between processes over a Unix stream socket: one `sendmsg` with
/// a JSON array of ``GuestRegion`` and exactly one fd in `SCM_RIGHTS` (Firecracker's protocol).
/// The sender keeps the connection open while it wants to be served; the receiver treats the
/// end of the connection together with the end of the process as "gone".
public enum Handoff {
    /// The largest body accepted by default (Firecracker sends ~100 bytes per region).
    public static let defaultMaxBody = 64 << 10

    /// Connects to `path` and sends `uffd` (its fd) with `regions`; returns the connected
    /// socket, which the caller keeps open for as long as it wants its memory served (closing
    /// it tells the server the process may be gone).
    ///
    /// A refusal has no reply in this protocol: the server closes the connection. When it
    /// closed before the `sendmsg`, this throws `.closed`; when after, the send succeeded and
    /// the end of the returned socket (EOF or ECONNRESET) is the refusal, and faults on the
    /// regions stay unserved, as with Firecracker.
    /// - Throws: ``HandoffError`` `.closed` when the server refused first, `.socket` with the
    ///   failing call and errno otherwise.
    public static func send(_ uffd: Userfaultfd, regions: [GuestRegion], to path: String) throws(HandoffError) -> Int32 {
        let s = try connect(to: path)
        do {
            try send(fd: uffd.fd, body: GuestRegion.encode(regions), over: s)
        } catch {
            Glibc.close(s)
            throw error
        }
        return s
    }

    /// Connects a Unix stream socket to `path` (close-on-exec).
    public static func connect(to path: String) throws(HandoffError) -> Int32 {
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw HandoffError(.socket, "socket: \(Errno(rawValue: errno))") }
        var addr = try unixAddress(path)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            let e = Errno(rawValue: errno)
            Glibc.close(s)
            throw HandoffError(.socket, "connect \(path): \(e)")
        }
        return s
    }

    /// One `sendmsg` of `body` with `fds` (any number, for tests of bad peers) in SCM_RIGHTS.
    public static func send(fds: [Int32], body: [UInt8], over socket: Int32) throws(HandoffError) {
        let hdr = MemoryLayout<cmsghdr>.size
        let space = fds.isEmpty ? 0 : hdr + (fds.count * 4 + 7) / 8 * 8
        var control = [UInt64](repeating: 0, count: max(1, space / 8))
        var body = body
        let n: Int = control.withUnsafeMutableBytes { ctl in
            if !fds.isEmpty {
                ctl.storeBytes(of: hdr + fds.count * 4, toByteOffset: 0, as: Int.self)
                ctl.storeBytes(of: SOL_SOCKET, toByteOffset: 8, as: Int32.self)
                ctl.storeBytes(of: Int32(SCM_RIGHTS), toByteOffset: 12, as: Int32.self)
                for (i, fd) in fds.enumerated() { ctl.storeBytes(of: fd, toByteOffset: hdr + 4 * i, as: Int32.self) }
            }
            return body.withUnsafeMutableBytes { b in
                var iov = iovec(iov_base: b.baseAddress, iov_len: b.count)
                return withUnsafeMutablePointer(to: &iov) { iovp in
                    var msg = msghdr()
                    msg.msg_iov = iovp
                    msg.msg_iovlen = 1
                    if !fds.isEmpty {
                        msg.msg_control = ctl.baseAddress
                        msg.msg_controllen = space
                    }
                    var r: Int
                    repeat { r = sendmsg(socket, &msg, Int32(MSG_NOSIGNAL)) } while r < 0 && errno == EINTR
                    return r
                }
            }
        }
        guard n >= 0 else {
            let e = Errno(rawValue: errno)
            // A server refuses before reading (e.g. a uid not in --allow-uid: nothing of an
            // untrusted peer is read); when its close comes first, this is how it shows here.
            if e == .brokenPipe || e == .connectionReset {
                throw HandoffError(.closed, "sendmsg: the server closed the connection before the hand-off (\(e)): it refused this process, its log says why")
            }
            throw HandoffError(.socket, "sendmsg: \(e)")
        }
        guard n == body.count else { throw HandoffError(.socket, "sendmsg sent \(n) of \(body.count) bytes") }
    }

    /// Sends one fd with `body` (the protocol's single message).
    public static func send(fd: Int32, body: [UInt8], over socket: Int32) throws(HandoffError) {
        try send(fds: [fd], body: body, over: socket)
    }

    /// The peer's credentials on a connected Unix socket (SO_PEERCRED).
    public static func peerCredentials(_ socket: Int32) -> PeerCredentials? {
        var cred = (Int32(0), UInt32(0), UInt32(0))
        var len = socklen_t(MemoryLayout.size(ofValue: cred))
        let rc = getsockopt(socket, SOL_SOCKET, SO_PEERCRED, &cred, &len)
        guard rc == 0 else { return nil }
        return PeerCredentials(pid: cred.0, uid: cred.1, gid: cred.2)
    }

    /// Receives a hand-off on a connected socket: waits up to `timeoutMilliseconds` for the
    /// message, takes the fds it carries (exactly one is required; all are closed otherwise),
    /// reads the body (at most `maxBody` bytes; a body whose JSON is incomplete is read on
    /// until complete or the timeout), decodes the regions, checks the uid against `allowedUIDs`
    /// (nil: anyone) and that the fd is a userfaultfd. The regions are not checked against a
    /// memory file here (see ``GuestRegion/validate(_:memoryFileLength:)``).
    ///
    /// The adopted fd's features are read from the kernel (`/proc/self/fdinfo`), so they are
    /// the sender's exactly; pass `features` to state them instead.
    public static func receive(on socket: Int32, timeoutMilliseconds: Int32 = 5000, maxBody: Int = defaultMaxBody,
                               allowedUIDs: Set<UInt32>? = nil, features: Features? = nil) throws(HandoffError) -> ReceivedHandoff {
        guard let peer = peerCredentials(socket) else {
            throw HandoffError(.socket, "SO_PEERCRED: \(Errno(rawValue: errno))")
        }
        if let allowedUIDs, !allowedUIDs.contains(peer.uid) {
            throw HandoffError(.notAllowed, "peer \(peer) is not an allowed uid (allowed: \(allowedUIDs.sorted().map(String.init).joined(separator: ",")))")
        }
        var fds: [Int32] = []
        do throws(HandoffError) {
            let (body, regions) = try receiveBody(socket, peer: peer, timeoutMilliseconds: timeoutMilliseconds,
                                                  maxBody: maxBody, fds: &fds)
            guard let fd = fds.first else { throw HandoffError(.fds, "unreachable: no fd") }
            guard isUserfaultfd(fd), let granted = features ?? Userfaultfd.features(ofFD: fd) else {
                throw HandoffError(.notUserfaultfd, "the fd sent is not a userfaultfd after its UFFDIO_API handshake")
            }
            return ReceivedHandoff(uffd: Userfaultfd(adopting: fd, features: granted), regions: regions, peer: peer, body: body)
        } catch {
            // Every fd received is closed on any refusal (none leaks into this process).
            for f in fds { Glibc.close(f) }
            throw error
        }
    }

    /// Reads the message: the body (until its JSON is complete, the peer stops or the
    /// timeout) and exactly one fd (all fds received are appended to `fds` for the caller to
    /// own or close).
    private static func receiveBody(_ socket: Int32, peer: PeerCredentials, timeoutMilliseconds: Int32, maxBody: Int,
                                    fds: inout [Int32]) throws(HandoffError) -> ([UInt8], [GuestRegion]) {
        let deadline = cuffd_now_ns() &+ UInt64(max(0, timeoutMilliseconds)) * 1_000_000
        var body: [UInt8] = []
        var truncatedFDs = false
        var closed = false
        var regions: [GuestRegion]? = nil
        while true {
            let now = cuffd_now_ns()
            let left = deadline > now ? Int32((deadline - now) / 1_000_000) : 0
            var p = pollfd(fd: socket, events: Int16(POLLIN), revents: 0)
            let pr = poll(&p, 1, left)
            if pr < 0 && errno == EINTR { continue }
            if pr == 0 {
                if body.isEmpty && fds.isEmpty {
                    throw HandoffError(.timeout, "peer \(peer) sent nothing within \(timeoutMilliseconds) ms")
                }
                break
            }
            let (n, got, ctrunc) = recvChunk(socket, room: maxBody + 1 - body.count, into: &body)
            fds += got
            if n < 0 { throw HandoffError(.socket, "recvmsg: \(Errno(rawValue: -Int32(n)))") }
            truncatedFDs = truncatedFDs || ctrunc
            if n == 0 { closed = true; break }
            if body.count > maxBody { throw HandoffError(.tooLarge, "body over \(maxBody) bytes") }
            // Firecracker sends everything in one sendmsg: stop as soon as the JSON is whole.
            if let r = try? GuestRegion.decode(body) { regions = r; break }
        }
        if fds.count != 1 || truncatedFDs {
            if body.isEmpty && fds.isEmpty && closed {
                throw HandoffError(.closed, "peer \(peer) closed the connection without sending")
            }
            let count = truncatedFDs ? "more than \(fds.count)" : "\(fds.count)"
            throw HandoffError(.fds, "the hand-off carried \(count) fds, exactly 1 (the userfaultfd) is required")
        }
        if body.isEmpty { throw HandoffError(.malformed, "the hand-off had an fd but no body") }
        if let regions { return (body, regions) }
        return (body, try GuestRegion.decode(body))
    }

    /// One `recvmsg` without waiting (for a datagram or seqpacket control channel): the bytes
    /// (at most `maxBytes`) and the fds received (close-on-exec). nil when nothing is queued;
    /// an empty array of bytes and no fds at the end of the connection.
    public static func receiveMessage(on socket: Int32, maxBytes: Int = defaultMaxBody) throws(HandoffError) -> ([UInt8], [Int32])? {
        var bytes: [UInt8] = []
        let (n, fds, _) = recvChunk(socket, room: maxBytes, into: &bytes)
        if n == -Int(EAGAIN) { return nil }
        if n < 0 { throw HandoffError(.socket, "recvmsg: \(Errno(rawValue: -Int32(n)))") }
        return (bytes, fds)
    }

    /// Whether `fd` is a userfaultfd (its /proc/self/fd link is `anon_inode:[userfaultfd]`).
    public static func isUserfaultfd(_ fd: Int32) -> Bool {
        var buf = [CChar](repeating: 0, count: 64)
        let n = readlink("/proc/self/fd/\(fd)", &buf, buf.count - 1)
        guard n > 0 else { return false }
        return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) == "anon_inode:[userfaultfd]"
    }

    /// One recvmsg: (bytes or -errno, the fds received, control data truncated); the bytes
    /// are in `out`.
    private static func recvChunk(_ s: Int32, room: Int, into out: inout [UInt8]) -> (Int, [Int32], Bool) {
        let hdr = MemoryLayout<cmsghdr>.size
        let ctlSpace = hdr + 8 * 4 // room for 8 fds: more than one is already an error
        var control = [UInt64](repeating: 0, count: ctlSpace / 8)
        var buf = [UInt8](repeating: 0, count: max(1, room))
        let r: (Int, [Int32], Bool) = buf.withUnsafeMutableBytes { b in
                control.withUnsafeMutableBytes { ctl in
                    var iov = iovec(iov_base: b.baseAddress, iov_len: max(1, room))
                    return withUnsafeMutablePointer(to: &iov) { iovp in
                        var msg = msghdr()
                        msg.msg_iov = iovp
                        msg.msg_iovlen = 1
                        msg.msg_control = ctl.baseAddress
                        msg.msg_controllen = ctlSpace
                        var n: Int
                        repeat { n = recvmsg(s, &msg, Int32(MSG_CMSG_CLOEXEC) | Int32(MSG_DONTWAIT)) } while n < 0 && errno == EINTR
                        if n < 0 { return (-Int(errno), [], false) }
                        var fds: [Int32] = []
                        var off = 0
                        while off + hdr <= Int(msg.msg_controllen) {
                            let len = ctl.load(fromByteOffset: off, as: Int.self)
                            let level = ctl.load(fromByteOffset: off + 8, as: Int32.self)
                            let type = ctl.load(fromByteOffset: off + 12, as: Int32.self)
                            guard len >= hdr else { break }
                            if level == SOL_SOCKET && type == Int32(SCM_RIGHTS) {
                                for i in 0..<(len - hdr) / 4 {
                                    fds.append(ctl.load(fromByteOffset: off + hdr + 4 * i, as: Int32.self))
                                }
                            }
                            off += (len + 7) / 8 * 8
                        }
                        return (n, fds, msg.msg_flags & Int32(MSG_CTRUNC) != 0)
                    }
                }
            }
        if r.0 > 0 { out += buf[0..<r.0] }
        return r
    }

    static func unixAddress(_ path: String) throws(HandoffError) -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let cap = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < cap, !bytes.isEmpty else {
            throw HandoffError(.socket, "socket path '\(path)' is empty or longer than \(cap - 1) bytes")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in bytes.enumerated() { p[i] = b }
        }
        return addr
    }
}

/// A listening Unix stream socket for hand-offs.
public final class HandoffListener: Sendable {
    /// The listening fd (close-on-exec; survives a re-exec only when the caller clears that).
    public let fd: Int32
    /// The path bound (nil when adopted).
    public let path: String?

    /// Binds `path` (a stale socket file there is replaced; any other file is an error),
    /// sets its mode (0600 by default) and listens.
    public init(path: String, mode: mode_t = 0o600, backlog: Int32 = 128) throws(HandoffError) {
        var st = stat()
        if lstat(path, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else {
                throw HandoffError(.socket, "\(path) exists and is not a socket (remove it or choose another --socket)")
            }
            // A socket someone still listens on is not stale: never steal a running server's path.
            if let probe = try? Handoff.connect(to: path) {
                Glibc.close(probe)
                throw HandoffError(.socket, "\(path): another server is listening there (stop it or choose another --socket)")
            }
            unlink(path)
        }
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw HandoffError(.socket, "socket: \(Errno(rawValue: errno))") }
        let failure: HandoffError? = {
            let addr: sockaddr_un
            do throws(HandoffError) { addr = try Handoff.unixAddress(path) } catch { return error }
            var a = addr
            // The mode applies from the bind on: no window where others may connect.
            let old = umask(0o777 & ~mode)
            let rc = withUnsafePointer(to: &a) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            let e = errno
            umask(old)
            guard rc == 0 else { return HandoffError(.socket, "bind \(path): \(Errno(rawValue: e))") }
            _ = chmod(path, mode)
            guard listen(s, backlog) == 0 else { return HandoffError(.socket, "listen \(path): \(Errno(rawValue: errno))") }
            return nil
        }()
        if let failure {
            Glibc.close(s)
            throw failure
        }
        fd = s
        self.path = path
    }

    /// Adopts a listening socket inherited from an earlier process (a restart).
    public init(adopting fd: Int32, path: String? = nil) {
        self.fd = fd
        self.path = path
    }

    /// Waits up to `timeoutMilliseconds` for a connection; nil on timeout (or EINTR).
    public func accept(timeoutMilliseconds: Int32) throws(HandoffError) -> Int32? {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let pr = poll(&p, 1, timeoutMilliseconds)
        if pr < 0 && errno == EINTR { return nil }
        guard pr > 0 else { return nil }
        let c = Glibc.accept(fd, nil, nil)
        if c >= 0 { _ = fcntl(c, F_SETFD, FD_CLOEXEC) }
        if c < 0 {
            if errno == EAGAIN || errno == EINTR || errno == ECONNABORTED { return nil }
            throw HandoffError(.socket, "accept: \(Errno(rawValue: errno))")
        }
        return c
    }

    /// Closes the socket and removes its path.
    public func close() {
        Glibc.close(fd)
        if let path { unlink(path) }
    }
}

extension Userfaultfd {
    /// The features enabled on a userfaultfd of this process, read from the kernel
    /// (`/proc/self/fdinfo/FD`, line `API: <api>:<features>:<ioctls>`): how a receiver learns
    /// the sender's features. nil when the fd is not a userfaultfd or its handshake is not done.
    public static func features(ofFD fd: Int32) -> Features? {
        guard let text = try? String(contentsOfFile: "/proc/self/fdinfo/\(fd)", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("API:") {
            let parts = line.dropFirst(4).trimmingCharacters(in: .whitespaces).split(separator: ":")
            guard parts.count >= 2, let raw = UInt64(parts[1], radix: 16) else { return nil }
            // Bit 31 is the kernel's internal "handshake done" flag (UFFD_FEATURE_INITIALIZED).
            guard raw & (1 << 31) != 0 else { return nil }
            return Features(rawValue: raw & ~(1 << 31))
        }
        return nil
    }
}
