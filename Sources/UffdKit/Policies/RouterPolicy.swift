/// Sends faults in different sub-ranges to different policies (e.g. a file-backed part, a
/// zero-filled heap, a poisoned guard area). Events go to every policy.
public final class RouterPolicy: FaultPolicy {
    /// One sub-range and its policy.
    public struct Route: Sendable {
        /// Start of the sub-range.
        public let start: UInt
        /// Length of the sub-range.
        public let length: Int
        /// The policy for faults inside it.
        public let policy: any FaultPolicy

        /// A route for `[start, start+length)`.
        public init(start: UInt, length: Int, policy: any FaultPolicy) {
            self.start = start
            self.length = length
            self.policy = policy
        }
    }

    /// The routes, sorted by start.
    public let routes: [Route]
    /// The policy for faults outside every route (nil: such a fault is an error → fallback).
    public let fallbackPolicy: (any FaultPolicy)?
    private let starts: [UInt]

    /// Routes faults by address; routes must not overlap.
    public init(_ routes: [Route], otherwise: (any FaultPolicy)? = nil) throws(UffdError) {
        let sorted = routes.sorted { $0.start < $1.start }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.start + UInt(a.length) > b.start {
            throw UffdError(.argument, .invalidArgument, detail: "overlapping routes at \(hex(b.start))")
        }
        self.routes = sorted
        self.starts = sorted.map(\.start)
        self.fallbackPolicy = otherwise
    }

    /// The policy of the route containing the fault.
    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        // Binary search for the last route starting at or before the address.
        var lo = 0, hi = starts.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if starts[mid] <= fault.address { lo = mid + 1 } else { hi = mid }
        }
        if lo > 0 {
            let r = routes[lo - 1]
            if fault.address - r.start < UInt(r.length) { return try r.policy.resolve(fault, context: context) }
        }
        if let fallbackPolicy { return try fallbackPolicy.resolve(fault, context: context) }
        throw UffdError(.argument, .badAddress, detail: "no route for \(hex(fault.address))")
    }

    /// Forwards events to every policy.
    public func handle(event: Event, context: borrowing FaultContext) {
        for r in routes { r.policy.handle(event: event, context: context) }
        fallbackPolicy?.handle(event: event, context: context)
    }

    /// The largest scratch need of the routed policies.
    public var scratchBytes: Int {
        routes.map(\.policy.scratchBytes).reduce(fallbackPolicy?.scratchBytes ?? 0, Swift.max)
    }
}
