import Foundation

/// The process exit codes uffdctl documents.
enum CLIExit: Int32 {
    case success = 0
    /// An operation failed, or verification found a wrong byte.
    case failed = 1
    /// Bad usage or input.
    case usage = 2
    /// The kernel or permissions do not allow it.
    case notAllowed = 3
}

/// An error that ends the command with one clear line on stderr and a documented exit code.
struct CLIError: Error {
    var exitCode: CLIExit
    var message: String
    /// What to do about it, printed after the message when present.
    var fix: String?

    static func usage(_ message: String) -> CLIError { CLIError(exitCode: .usage, message: message) }
    static func failed(_ message: String) -> CLIError { CLIError(exitCode: .failed, message: message) }
    static func notAllowed(_ message: String, fix: String) -> CLIError {
        CLIError(exitCode: .notAllowed, message: message, fix: fix)
    }

    func report() {
        var text = "uffdctl: \(message)\n"
        if let fix { text += "fix: \(fix)\n" }
        FileHandle.standardError.write(Data(text.utf8))
    }
}
