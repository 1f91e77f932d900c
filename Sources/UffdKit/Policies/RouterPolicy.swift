import Synchronization
import SystemPackage

/// Sends faults in different sub-ranges to different policies (e.g. a file-backed part, a
/// zero-filled heap, a poisoned guard area). Events go to every policy. Routes follow remap
/// and unmap events of all or part of their range (``ServedRange``), so faults at the new
/// address still reach their policy.
public final class RouterPolicy: FaultPolicy {
    /// One sub-range and its policy.
    public struct Route: Sendable {
        /// The sub-range (follows remaps).
        public let range: ServedRange
        /// The policy for faults inside it.
        public let policy: any FaultPolicy

        /// A route for `[start, start+length)`.
        public init(start: UInt, length: Int, policy: any FaultPolicy) {
            self.init(range: ServedRange(start: start, length: length), policy: policy)
        }

        /// A route for `range`.
        public init(range: ServedRange, policy: any FaultPolicy) {
            self.range = range
            self.policy = policy
        }
    }

    /// The routes, sorted by their start when the router was made.
    public let routes: [Route]
    /// The policy for faults outside every route (nil: such a fault is an error → fallback).
    public let otherwise: (any FaultPolicy)?
    private let starts: [UInt]
    /// Set once a route was remapped or unmapped: the sorted starts no longer hold, routes
    /// are then searched one by one.
    private let moved = Atomic<Bool>(false)

    /// Routes faults by address; routes must not overlap.
    public init(_ routes: [Route], otherwise: (any FaultPolicy)? = nil) throws(UffdError) {
        let sorted = routes.sorted { $0.range.start < $1.range.start }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.range.start + UInt(a.range.length) > b.range.start {
            throw UffdError(.argument, .invalidArgument, detail: "overlapping routes at \(hex(b.range.start))")
        }
        self.routes = sorted
        self.starts = sorted.map(\.range.start)
        self.otherwise = otherwise
        if sorted.contains(where: { $0.range.segments.count != 1 || !$0.range.leftBehind.isEmpty }) { moved.store(true, ordering: .relaxed) }
    }

    /// The policy of the route containing the fault.
    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        if let r = route(for: fault.address) { return try r.policy.resolve(fault, context: context) }
        // A route's memory that was unmapped or remapped away: gone, not the other policy's.
        if moved.load(ordering: .acquiring), let r = routes.first(where: { $0.range.isGone(fault.address) }) {
            return r.range.goneAnswer(fault)
        }
        if let otherwise { return try otherwise.resolve(fault, context: context) }
        throw UffdError(.argument, .badAddress, detail: "no route for \(hex(fault.address))")
    }

    /// The route holding `address`, if any.
    @inline(__always)
    func route(for address: UInt) -> Route? {
        if moved.load(ordering: .acquiring) {
            for r in routes where r.range.contains(address) { return r }
            return nil
        }
        // Binary search for the last route starting at or before the address.
        var lo = 0, hi = starts.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if starts[mid] <= address { lo = mid + 1 } else { hi = mid }
        }
        if lo > 0, routes[lo - 1].range.contains(address) { return routes[lo - 1] }
        return nil
    }

    /// Routes follow the event; then it goes to every policy.
    public func handle(event: Event, context: borrowing FaultContext) {
        var changed = false
        for r in routes { changed = r.range.follow(event) || changed }
        if changed { moved.store(true, ordering: .releasing) }
        for r in routes { r.policy.handle(event: event, context: context) }
        otherwise?.handle(event: event, context: context)
    }

    /// Tells the policy that decided the fault (its route's, or ``otherwise``).
    public func failed(_ fault: Fault, resolution: Resolution, errno: Errno, context: borrowing FaultContext) {
        if let r = route(for: fault.address) {
            r.policy.failed(fault, resolution: resolution, errno: errno, context: context)
        } else {
            otherwise?.failed(fault, resolution: resolution, errno: errno, context: context)
        }
    }

    /// The same routes, with copies of their ranges and the policies' children.
    public func forkedChild() -> any FaultPolicy {
        let child = routes.map { Route(range: $0.range.copy(), policy: $0.policy.forkedChild()) }
        return (try? RouterPolicy(child, otherwise: otherwise?.forkedChild())) ?? self
    }

    /// The largest scratch need of the routed policies.
    public var scratchBytes: Int {
        routes.map(\.policy.scratchBytes).reduce(otherwise?.scratchBytes ?? 0, Swift.max)
    }
}
