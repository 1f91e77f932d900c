/// A policy that can fill any page-aligned sub-range of the memory it serves (so a
/// ``ReadaheadPolicy`` can widen its resolutions).
public protocol RangeFillingPolicy: FaultPolicy {
    /// The start of the memory served (current, after remaps).
    var rangeStart: UInt { get }
    /// The length of the memory served.
    var rangeLength: Int { get }
    /// The page size of the memory served.
    var pageSize: Int { get }
    /// The resolution filling `[start, start+length)` (page-aligned, inside the range).
    func fill(_ start: UInt, length: Int, context: borrowing FaultContext) throws -> Resolution
}

/// A fault outside the memory a policy serves (a routing or registration mistake).
func outsideRange(_ fault: Fault, _ start: UInt, _ length: Int) -> UffdError {
    UffdError(.argument, .badAddress,
              detail: "fault at \(hex(fault.address)) outside the policy's range \(hex(start))+\(length)")
}
