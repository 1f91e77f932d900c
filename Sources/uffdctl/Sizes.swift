import Foundation

/// Parses "4096", "64K", "64M", "1G", "2MiB", "512k" into bytes (powers of 1024).
/// - Throws: ``CLIError`` usage for anything else, zero, or a size that overflows.
func parseSize(_ text: String, option: String) throws(CLIError) -> Int {
    let t = text.trimmingCharacters(in: .whitespaces)
    var digits = Substring(t)
    var suffix = ""
    while let last = digits.last, !last.isNumber {
        suffix = String(last) + suffix
        digits = digits.dropLast()
    }
    guard !digits.isEmpty else {
        throw .usage("\(option) '\(text)' is not a size (examples: 4096, 64K, 64M, 1G)")
    }
    let shift: Int
    switch suffix.lowercased() {
    case "", "b": shift = 0
    case "k", "kb", "kib": shift = 10
    case "m", "mb", "mib": shift = 20
    case "g", "gb", "gib": shift = 30
    case "t", "tb", "tib": shift = 40
    default:
        throw .usage("\(option) '\(text)': unknown suffix '\(suffix)' (use a number with K, M, G or T)")
    }
    guard !digits.isEmpty, digits.allSatisfy(\.isNumber), let n = Int(digits) else {
        throw .usage("\(option) '\(text)' is not a size (examples: 4096, 64K, 64M, 1G)")
    }
    let (bytes, overflow) = n.multipliedReportingOverflow(by: 1 << shift)
    guard !overflow else { throw .usage("\(option) '\(text)' is too large") }
    guard bytes > 0 else { throw .usage("\(option) must be greater than 0 (got '\(text)')") }
    return bytes
}

/// "64.0 MiB", "4.0 KiB", "123 B".
func formatBytes<T: BinaryInteger>(_ value: T) -> String {
    let v = Double(value)
    if v >= 1_099_511_627_776 { return String(format: "%.1f TiB", v / 1_099_511_627_776) }
    if v >= 1_073_741_824 { return String(format: "%.1f GiB", v / 1_073_741_824) }
    if v >= 1_048_576 { return String(format: "%.1f MiB", v / 1_048_576) }
    if v >= 1024 { return String(format: "%.1f KiB", v / 1024) }
    return "\(value) B"
}

/// Physical memory of the machine in bytes.
func physicalMemory() -> Int {
    Int(sysconf(Int32(_SC_PHYS_PAGES))) * Int(sysconf(Int32(_SC_PAGESIZE)))
}

/// A value from /proc/meminfo (the number as written, kB for sizes).
func meminfoValue(_ key: String) -> Int? {
    guard let text = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8) else { return nil }
    for line in text.split(separator: "\n") where line.hasPrefix(key + ":") {
        return Int(line.dropFirst(key.count + 1).trimmingCharacters(in: .whitespaces).split(separator: " ").first ?? "")
    }
    return nil
}
