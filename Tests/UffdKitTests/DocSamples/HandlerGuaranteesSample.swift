import UffdKit

// --- doc begin handler-guarantees
/// A policy that gives up on every fault.
struct RefusingPolicy: FaultPolicy {
    struct Refused: Error {}
    func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        throw Refused()
    }
}

/// Touches a page the policy refuses: the fallback maps a zero page, the thread goes on, and
/// the failure is reported to the handler's owner.
func touchRefusedPage() throws -> (byte: UInt8, failures: [HandlerFailure]) {
    let region = try MappedRegion(.anonymous(), length: basePageSize)
    let uffd = try Userfaultfd()
    try uffd.register(region.address, length: region.length, modes: .missing)
    var options = FaultHandler.Options()
    options.fallback = .zeroFill   // default .poison: the thread would get SIGBUS instead
    let handler = FaultHandler(uffd: uffd, policy: RefusingPolicy(), options: options)
    try handler.start()
    let byte = region.bytes[0]     // never hangs: the fallback resolves the fault
    handler.stop()
    return (byte, handler.failures())
}
// --- doc end
