import CUffd

/// Bytes that arrive later: a page source whose reads are asynchronous (HTTP range requests, an
/// object store, a compressed chunk store, a slow disk). A ``DeferredCopyPolicy`` asks it for
/// one chunk at a time, on the handler's reader thread, and the reader goes on with other faults
/// while the chunk is on its way.
///
/// The contract, for implementers:
/// - ``fetch(offset:length:into:)`` must return promptly: queue the request (a curl multi
///   handle, a thread pool, an event loop) and return. It runs on a reader thread, where
///   blocking stalls every fault behind it.
/// - Finish every request exactly once, from any thread: ``DeferredFetch/deliver(_:)`` with
///   exactly `length` bytes, or ``DeferredFetch/fail(_:)`` with the error (the handler's
///   fallback then unblocks the faulting threads and the error reaches the handler's owner).
///   The fallback covers the whole chunk: with `.poison` every page of it raises SIGBUS when
///   touched, with `.zeroFill` it reads zeros, with `.wake` its threads re-fault and the chunk
///   is requested again.
///   Never deliver bytes you are not sure of (a short read, a changed object): fail instead.
/// - A request may outlive its usefulness: after the handler's deadline
///   (``FaultHandler/Options/deferredDeadline``) or a ``FaultHandler/stop()``, finishing it
///   returns ``DeferredOutcome/expired`` or ``DeferredOutcome/cancelled`` and does nothing;
///   a source may stop work early on seeing that, and should give up on its own after the
///   deadline (a request that is never finished costs one table entry until then).
/// - Concurrency: at most ``FaultHandler/Options/maxDeferredFetches`` requests are in flight;
///   bound your own parallelism (connections) below that and queue the rest. Faults on a chunk
///   already requested never reach the source (single flight).
public protocol DeferredSource: Sendable {
    /// Total bytes of the source (faults beyond get the fallback).
    var length: Int { get }
    /// Bytes per request: a multiple of the registered memory's page size (e.g. 2 MiB, one
    /// frame of a packed snapshot). The last chunk may be shorter (up to ``length``, rounded
    /// up to the page size; the source pads it with zeros).
    var chunkSize: Int { get }
    /// Starts fetching `[offset, offset+length)` of the source; finish `fetch` once, later.
    func fetch(offset: Int, length: Int, into fetch: DeferredFetch)
}

/// Serves MISSING faults in `[destination, destination + source.length)` from a
/// ``DeferredSource``: the fault's chunk is requested once (single flight), every fault inside
/// it waits for that request, and one UFFDIO_COPY of the chunk wakes them all.
///
/// Faults outside the range, and chunks that cannot be deferred (the table is full or the
/// handler is stopping), get the handler's fallback with the reason reported.
public struct DeferredCopyPolicy: FaultPolicy {
    /// Start of the served range.
    public let destination: UInt
    /// Where the bytes come from.
    public let source: any DeferredSource
    /// The page size of the registered memory (the huge page size for hugetlb).
    public let pageSize: Int

    /// Serves `[destination, destination + source.length)` from `source`.
    public init(destination: UInt, source: any DeferredSource, pageSize: Int = basePageSize) {
        precondition(source.chunkSize > 0 && source.chunkSize % pageSize == 0,
                     "chunkSize must be a positive multiple of the page size")
        self.destination = destination
        self.source = source
        self.pageSize = pageSize
    }

    public func resolve(_ fault: Fault, context: borrowing FaultContext) throws -> Resolution {
        guard fault.address >= destination, fault.address - destination < UInt(source.length) else {
            throw UffdError(.source, .badAddress, detail: "fault at \(hex(fault.address)) outside the deferred source's range")
        }
        let chunk = source.chunkSize
        let offset = Int(fault.address - destination) / chunk * chunk
        let end = Swift.min(offset + chunk, (source.length + pageSize - 1) / pageSize * pageSize)
        switch try context.deferFill(destination + UInt(offset), length: end - offset, pageSize: pageSize) {
        case .fetch(let f): source.fetch(offset: offset, length: end - offset, into: f)
        case .joined: break
        }
        return .deferred
    }
}
