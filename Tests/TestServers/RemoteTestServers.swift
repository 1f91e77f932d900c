import Foundation
import XCTest

/// Real servers on loopback for the remote-source tests (UffdKitTests and uffdctlTests share
/// them through this target), each started by the test that needs it
/// (in its own temp dir) and stopped by it. A server that cannot start skips the test with the
/// reason.

/// A running child process.
public final class ServerProcess: @unchecked Sendable {
    public let process = Process()
    public let dir: URL
    public init(dir: URL) { self.dir = dir }

    /// Ends the server (SIGTERM, then SIGKILL) and waits for it.
    public func stop() {
        guard process.isRunning else { return }
        process.terminate()
        for _ in 0..<100 where process.isRunning { usleep(20_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    deinit {
        stop()
        try? FileManager.default.removeItem(at: dir)
    }
}

public func makeTempDir(_ name: String) throws -> URL {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("uffdkit-\(name)-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true,
                                            attributes: [.posixPermissions: 0o755])
    return dir
}

/// A TCP port nobody listens on right now (bind to 0, read it back, close).
public func freePort() -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = 0
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
    _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
    return Int(UInt16(bigEndian: addr.sin_port))
}

/// Where `make deps` puts moto's virtual environment (the Makefile's MOTO_VENV).
public var motoVenvBin: String {
    let env = ProcessInfo.processInfo.environment
    let cache = env["XDG_CACHE_HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? ((env["HOME"] ?? "/root") + "/.cache")
    return cache + "/uffdkit/moto-venv/bin"
}

/// Waits until something accepts connections on the port.
public func waitForPort(_ port: Int, seconds: Double = 10) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(port).bigEndian
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        close(fd)
        if rc == 0 { return true }
        usleep(50_000)
    }
    return false
}

public func findExecutable(_ name: String, extra: [String] = []) -> String? {
    let path = (ProcessInfo.processInfo.environment["PATH"] ?? "") + ":/usr/sbin:/usr/local/bin:/root/.pyenv/shims"
    for dir in extra + path.split(separator: ":").map(String.init) {
        let p = dir + "/" + name
        if FileManager.default.isExecutableFile(atPath: p) { return p }
    }
    return nil
}

/// A curl run that failed (a non-2xx status with --fail-with-body, or a transport error).
public struct CurlFailed: Error, CustomStringConvertible {
    public let status: Int32
    public let output: String
    public var description: String { "curl exited \(status): \(output.prefix(300))" }
}

/// Runs curl -sS --fail-with-body with `args`; returns what it printed, or throws CurlFailed.
@discardableResult
public func curl(_ args: [String]) throws -> String {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: findExecutable("curl")!)
    p.arguments = ["-sS", "--fail-with-body"] + args
    let out = Pipe()
    p.standardOutput = out
    p.standardError = out
    try p.run()
    let data = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    let text = String(decoding: data, as: UTF8.self)
    guard p.terminationStatus == 0 else { throw CurlFailed(status: p.terminationStatus, output: text) }
    return text
}

/// nginx (Debian nginx-light) serving `root` with Range support on a free loopback port.
public final class Nginx: @unchecked Sendable {
    public let server: ServerProcess
    public let port: Int
    public let root: URL
    public var base: String { "http://127.0.0.1:\(port)" }

    public init() throws {
        guard let nginx = findExecutable("nginx") else {
            throw XCTSkip("nginx not installed (make deps installs nginx-light)")
        }
        let dir = try makeTempDir("nginx")
        server = ServerProcess(dir: dir)
        root = dir.appendingPathComponent("www")
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o755])
        try FileManager.default.createDirectory(at: root.appendingPathComponent("denied"), withIntermediateDirectories: true)
        port = freePort()
        let user = getuid() == 0 ? "user root;\n" : ""
        let conf = """
            \(user)daemon off;
            worker_processes 1;
            pid \(dir.path)/nginx.pid;
            error_log \(dir.path)/error.log;
            events { worker_connections 256; }
            http {
                access_log off;
                client_body_temp_path \(dir.path)/tmp;
                proxy_temp_path \(dir.path)/tmp;
                fastcgi_temp_path \(dir.path)/tmp;
                uwsgi_temp_path \(dir.path)/tmp;
                scgi_temp_path \(dir.path)/tmp;
                keepalive_requests 100000;
                server {
                    listen 127.0.0.1:\(port);
                    root \(root.path);
                    location /denied/ { deny all; }
                }
            }
            """
        try conf.write(to: dir.appendingPathComponent("nginx.conf"), atomically: true, encoding: .utf8)
        server.process.executableURL = URL(fileURLWithPath: nginx)
        server.process.arguments = ["-c", dir.appendingPathComponent("nginx.conf").path, "-p", dir.path]
        server.process.standardOutput = FileHandle.nullDevice
        server.process.standardError = FileHandle.nullDevice
        try server.process.run()
        guard waitForPort(port) else {
            let log = (try? String(contentsOf: dir.appendingPathComponent("error.log"), encoding: .utf8)) ?? ""
            server.stop()
            throw XCTSkip("nginx did not start on port \(port): \(log.suffix(300))")
        }
    }

    /// Puts `data` at `/name`.
    @discardableResult
    public func put(_ name: String, _ data: Data) throws -> String {
        try data.write(to: root.appendingPathComponent(name))
        return "\(base)/\(name)"
    }

    public func url(_ name: String) -> String { "\(base)/\(name)" }
    public func stop() { server.stop() }
}

/// moto's S3 server with SigV4 verification on: after three unauthenticated IAM calls (create
/// a user, its access key and an allow-all policy), every request must carry a valid signature
/// made with that key.
public final class MotoS3: @unchecked Sendable {
    public let server: ServerProcess
    public let port: Int
    public let key: String
    public let secret: String
    public var endpoint: String { "http://127.0.0.1:\(port)" }

    public init() throws {
        guard let moto = findExecutable("moto_server", extra: [motoVenvBin]) else {
            throw XCTSkip("moto_server not installed (neither on PATH nor in \(motoVenvBin); make deps installs it)")
        }
        guard findExecutable("curl") != nil else { throw XCTSkip("curl not installed") }
        let dir = try makeTempDir("moto")
        server = ServerProcess(dir: dir)
        port = freePort()
        server.process.executableURL = URL(fileURLWithPath: moto)
        server.process.arguments = ["-H", "127.0.0.1", "-p", "\(port)"]
        var env = ProcessInfo.processInfo.environment
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
        server.process.environment = env
        let log = dir.appendingPathComponent("moto.log")
        _ = FileManager.default.createFile(atPath: log.path, contents: nil)
        server.process.standardOutput = try FileHandle(forWritingTo: log)
        server.process.standardError = server.process.standardOutput
        try server.process.run()
        guard waitForPort(port, seconds: 20) else {
            server.stop()
            throw XCTSkip("moto_server did not start on port \(port)")
        }
        let iam = ["--aws-sigv4", "aws:amz:us-east-1:iam", "--user", "bootstrap:bootstrap"]
        let endpoint = "http://127.0.0.1:\(port)/"
        _ = try MotoS3.setupCurl(iam + ["-d", "Action=CreateUser&UserName=uffdkit&Version=2010-05-08", endpoint])
        let keyXML = try MotoS3.setupCurl(iam + ["-d", "Action=CreateAccessKey&UserName=uffdkit&Version=2010-05-08", endpoint])
        let policy = #"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}"#
        _ = try MotoS3.setupCurl(iam + ["--data-urlencode", "PolicyDocument=\(policy)",
                            "-d", "Action=PutUserPolicy&UserName=uffdkit&PolicyName=all&Version=2010-05-08", endpoint])
        func field(_ name: String) -> String? {
            guard let r = keyXML.range(of: "<\(name)>"), let e = keyXML.range(of: "</\(name)>") else { return nil }
            return String(keyXML[r.upperBound..<e.lowerBound])
        }
        guard let k = field("AccessKeyId"), let s = field("SecretAccessKey") else {
            throw XCTSkip("moto did not create an access key: \(keyXML.prefix(300))")
        }
        key = k
        secret = s
    }

    /// The unauthenticated IAM set-up calls: a failure means this moto cannot verify SigV4 here,
    /// so the test is skipped with what it said.
    @discardableResult
    static func setupCurl(_ args: [String]) throws -> String {
        do { return try curl(args) } catch let e as CurlFailed {
            throw XCTSkip("moto setup: curl \(args.last ?? "") failed: \(e.output.prefix(300))")
        }
    }

    private var signed: [String] {
        ["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", "\(key):\(secret)", "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]
    }

    /// Bucket and object calls on the running, authenticated server: a refusal fails the test.
    public func createBucket(_ bucket: String) throws { try curl(signed + ["-X", "PUT", "\(endpoint)/\(bucket)"]) }

    public func put(_ bucket: String, _ key: String, file: URL) throws {
        let encoded = key.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed) ?? key
        try curl(signed + ["-T", file.path, "\(endpoint)/\(bucket)/\(encoded)"])
    }

    /// Sets AWS_* for this server's key (the library reads them at open).
    public func exportCredentials() {
        setenv("AWS_ACCESS_KEY_ID", key, 1)
        setenv("AWS_SECRET_ACCESS_KEY", secret, 1)
        setenv("AWS_REGION", "us-east-1", 1)
        unsetenv("AWS_SESSION_TOKEN")
    }

    public func stop() { server.stop() }
}

/// A misbehaving HTTP server (Python's http.server) serving one file under paths that choose
/// the misbehaviour of its chunk-sized GETs (requests under 4 KiB, such as the packed-magic
/// probe at open, are answered normally and not counted): `/ok/F`, `/truncate/F` (half the body, then close), `/long/F` (extra
/// bytes), `/norange/F` (200 with the whole file), `/flaky/F` (every other GET is a 503),
/// `/slow-MS/F` (each GET waits MS ms), `/latency-MS/F` (same, for latency),
/// `/replace-N/F` (after N GETs the object changes: new ETag, If-Match answered with 412),
/// `/replace-ignore-N/F` (same, but If-Match ignored: the new ETag and bytes are sent),
/// `/die-N/F` (the server exits at GET N+1). HEAD always answers with the size and ETag "v1".
public final class MisbehavingServer: @unchecked Sendable {
    public let server: ServerProcess
    public let port: Int
    public var base: String { "http://127.0.0.1:\(port)" }

    static let script = #"""
import http.server, os, sys, time, threading
path = sys.argv[1]
data = open(path, 'rb').read()
counts = {}
lock = threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    disable_nagle_algorithm = True   # headers and body are separate writes: no 40 ms delayed-ACK stalls
    def log_message(self, *a): pass
    def mode(self):
        parts = self.path.split('/')
        return parts[1] if len(parts) > 2 else 'ok'
    def do_HEAD(self):
        self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        self.send_header('ETag', '"v1"')
        self.send_header('Accept-Ranges', 'bytes')
        self.end_headers()
    def do_GET(self):
        m = self.mode()
        rng = self.headers.get('Range')
        if rng and m != 'norange':
            a, b = rng.split('=')[1].split('-')
            if int(b) - int(a) + 1 < 4096:
                m = 'ok'    # small probes (the packed magic, headers) are answered normally
        with lock:
            counts[m] = counts.get(m, 0) + 1
            n = counts[m]
        body, etag = data, '"v1"'
        if m.startswith('die-') and n > int(m[4:]):
            os._exit(0)
        if m.startswith('replace-'):
            limit = int(m.split('-')[-1])
            if n > limit:
                body, etag = bytes(b ^ 0xFF for b in data[:4096]) + data[4096:], '"v2"'
                if 'ignore' not in m and self.headers.get('If-Match') not in (None, etag):
                    self.send_response(412); self.send_header('Content-Length', '0'); self.end_headers(); return
        if m.startswith('slow-') or m.startswith('latency-'):
            time.sleep(int(m.split('-')[1]) / 1000.0)
        if m == 'flaky' and n % 2 == 1:
            self.send_response(503); self.send_header('Content-Length', '0'); self.end_headers(); return
        if m == 'norange' or not rng:
            self.send_response(200)
            self.send_header('Content-Length', str(len(body)))
            self.send_header('ETag', etag)
            self.end_headers()
            self.wfile.write(body)
            return
        a, b = rng.split('=')[1].split('-')
        a, b = int(a), min(int(b), len(body) - 1)
        part = body[a:b + 1]
        if m == 'long':
            part = part + b'EXTRA' * 100
        self.send_response(206)
        self.send_header('Content-Length', str(len(part)))
        self.send_header('Content-Range', 'bytes %d-%d/%d' % (a, b, len(body)))
        self.send_header('ETag', etag)
        self.end_headers()
        if m == 'truncate':
            self.wfile.write(part[:len(part) // 2]); self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(part)
class S(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
s = S(('127.0.0.1', 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""#

    public init(serving file: URL) throws {
        guard let python = findExecutable("python3") else { throw XCTSkip("python3 not installed") }
        let dir = try makeTempDir("pyserver")
        server = ServerProcess(dir: dir)
        let scriptURL = dir.appendingPathComponent("server.py")
        try MisbehavingServer.script.write(to: scriptURL, atomically: true, encoding: .utf8)
        server.process.executableURL = URL(fileURLWithPath: python)
        server.process.arguments = [scriptURL.path, file.path]
        let out = Pipe()
        server.process.standardOutput = out
        server.process.standardError = FileHandle.nullDevice
        try server.process.run()
        var line = Data()
        while true {
            let d = out.fileHandleForReading.readData(ofLength: 1)
            if d.isEmpty || d == Data("\n".utf8) { break }
            line.append(d)
        }
        guard let p = Int(String(decoding: line, as: UTF8.self)) else {
            server.stop()
            throw XCTSkip("the Python test server did not start")
        }
        port = p
    }

    public func url(_ mode: String, _ name: String = "img") -> String { "\(base)/\(mode)/\(name)" }
    public func stop() { server.stop() }
}

/// Test images: random chunks, zero chunks and a text tail (not a chunk multiple).
public func makeImage(chunks: Int, zeroEvery: Int = 3, chunkSize: Int = 2 << 20, tail: Int = 12345, seed: UInt64 = 7) -> Data {
    var d = Data(count: chunks * chunkSize + tail)
    d.withUnsafeMutableBytes { b in
        var x = seed
        let words = b.baseAddress!.assumingMemoryBound(to: UInt64.self)
        for c in 0..<chunks where c % zeroEvery != 0 {
            // Half random (incompressible), half a repeated byte (compressible).
            for i in 0..<(chunkSize / 16) {
                x = x &* 6364136223846793005 &+ 1442695040888963407
                words[(c * chunkSize) / 8 + i] = x
            }
            memset(b.baseAddress! + c * chunkSize + chunkSize / 2, Int32(c & 0xFF) | 1, chunkSize / 2)
        }
        memset(b.baseAddress! + chunks * chunkSize, 0x41, tail)
    }
    return d
}
