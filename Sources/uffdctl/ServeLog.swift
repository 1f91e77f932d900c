import Foundation
import Logging

/// `uffdctl serve`'s log lines on stderr: `uffdctl serve: <message> key=value ...`, or with
/// `--json` one JSON object per line (`{"ts":..,"level":..,"msg":..,<metadata>}`).
struct ServeLogHandler: LogHandler {
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]
    let json: Bool
    let label: String

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var all = metadata
        if let m = event.metadata { all.merge(m) { $1 } }
        let line: String
        if json {
            var obj: [String: Any] = ["ts": Date().timeIntervalSince1970, "level": event.level.rawValue,
                                      "msg": event.message.description, "pid": Int(getpid())]
            for (k, v) in all { obj[k] = jsonValue(v) }
            let data = (try? JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys])) ?? Data()
            line = String(decoding: data, as: UTF8.self)
        } else {
            let kv = all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
            line = "\(label): \(event.level == .info ? "" : "\(event.level): ")\(event.message)\(kv.isEmpty ? "" : " " + kv)"
        }
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }

    /// Counters and times as JSON numbers ("2048" -> 2048, "10.5" -> 10.5).
    private func number(_ s: String) -> Any? {
        if let i = Int(s) { return i }
        if s.contains("."), let d = Double(s), d.isFinite { return d }
        return nil
    }

    private func jsonValue(_ v: Logger.MetadataValue) -> Any {
        switch v {
        case .string(let s): return number(s) ?? s
        case .stringConvertible(let c): return number("\(c)") ?? "\(c)"
        case .array(let a): return a.map(jsonValue)
        case .dictionary(let d): return d.mapValues(jsonValue)
        }
    }
}

/// Sets up swift-log once per process.
func makeServeLogger(json: Bool, label: String) -> Logger {
    LoggingSystem.bootstrap { _ in ServeLogHandler(json: json, label: label) }
    return Logger(label: label)
}
