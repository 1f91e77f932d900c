import ArgumentParser
import Foundation

/// The root command. Exit codes: 0 success, 1 an operation failed, 2 bad usage or input,
/// 3 the kernel or permissions do not allow it (the fix is printed).
@main
struct Uffdctl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "uffdctl",
        abstract: "userfaultfd from the command line: inspect the kernel, run real sessions, benchmark.",
        discussion: """
            Every operation subcommand maps a region, registers it, starts a handler with that \
            operation's policy, drives a workload, verifies every byte and prints a summary. \
            With no options each runs a sensible default session.

            Exit codes:
              0  success
              1  an operation failed (or verification found a wrong byte)
              2  bad usage or input
              3  the kernel or permissions do not allow it (the fix is printed)
            """,
        subcommands: [
            FeaturesCommand.self,
            CopyCommand.self,
            ZeropageCommand.self,
            MoveCommand.self,
            ContinueCommand.self,
            WriteProtectCommand.self,
            PoisonCommand.self,
            BenchCommand.self,
            WorkingSetCommand.self,
            ServeCommand.self,
            HandoffClientCommand.self,
            SnapshotCommand.self,
        ]
    )

    static func main() {
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch let error as CLIError {
            error.report()
            Foundation.exit(error.exitCode.rawValue)
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                print(fullMessage(for: error))
                Foundation.exit(0)
            }
            // Argument parser errors are usage errors: one clear line, pointing at --help.
            var line = String(message(for: error).split(separator: "\n").first ?? "bad usage")
            if line.hasPrefix("Error: ") { line.removeFirst(7) }
            FileHandle.standardError.write(Data("uffdctl: \(line) (see --help)\n".utf8))
            Foundation.exit(CLIExit.usage.rawValue)
        }
    }
}
