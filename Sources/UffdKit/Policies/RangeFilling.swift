/// A policy that can fill any page-aligned sub-range of the memory it serves (so a
/// ``ReadaheadPolicy`` can widen its resolutions).
public protocol RangeFillingPolicy: FaultPolicy {
    /// The memory served (follows remaps).
    var range: ServedRange { get }
    /// The page size of the memory served.
    var pageSize: Int { get }
    /// The resolution filling `[start, start+length)` (page-aligned, inside one segment of the range).
    func fill(_ start: UInt, length: Int, context: borrowing FaultContext) throws -> Resolution
}
