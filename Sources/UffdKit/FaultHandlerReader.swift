import CUffd
import Histogram
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The thread entry: takes over the retain done by `start()`.
func readerMain(_ arg: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let r = Unmanaged<Reader>.fromOpaque(arg!).takeRetainedValue()
    r.run()
    return nil
}

// Capture-free C callbacks: `ctx` is the reader, unretained (its thread owns a reference).
let decideTrampoline: cuffd_decide_fn = { ctx, msgs, res, n in
    Unmanaged<Reader>.fromOpaque(ctx!)._withUnsafeGuaranteedRef { $0.decide(msgs!, res!, Int(n)) }
}

let completeTrampoline: cuffd_complete_fn = { ctx, msgs, res, n in
    Unmanaged<Reader>.fromOpaque(ctx!)._withUnsafeGuaranteedRef { $0.complete(msgs!, res!, Int(n)) }
}

/// One reader thread's state. Everything mutable is touched only by that thread, except
/// `published`, which `stats()` reads under its lock.
final class Reader: @unchecked Sendable {
    struct Published {
        var loop = cuffd_loop_stats()
        var latency = HandlerStats.makeHistogram()
    }

    let index: Int
    /// The run's descriptors (nil only when a test drives `decide` without a loop).
    let files: ReaderFiles?
    /// Signalled once this thread is past its start-up.
    let ready: ReadySignal?
    /// The run's table of deferred resolutions (nil: `deferFill` is refused).
    let deferred: DeferredTable?
    let features: Features
    /// The fd's UFFD_USER_MODE_ONLY (a forked child's fd inherits it).
    let userModeOnly: Bool
    let policy: any FaultPolicy
    let batch: Int
    let cpu: Int?
    let fallback: Int32
    let spinPolls: UInt32
    let name: String
    let sink: HandlerSink
    let startHook: (@Sendable () -> Void)?
    let pageMask: UInt
    let basePage: Int
    let exact: Bool
    let threadIDs: Bool
    let context: FaultContext
    let scratch: UnsafeMutableRawPointer?
    let scratchLength: Int
    let loopStats: UnsafeMutablePointer<cuffd_loop_stats>
    let published = Mutex(Published())
    /// Errors thrown by the policy in the current batch (index in the batch, error).
    var pendingErrors: [(Int, any Error)] = []
    /// Where fork events and failure reports go (nil: this reader does that work itself).
    let service: HandlerService?
    /// Policy errors on their way to the service.
    let errorSlots = Mutex(ErrorSlots())

    init?(index: Int, files: ReaderFiles?, ready: ReadySignal?, deferred: DeferredTable?, features: Features,
          userModeOnly: Bool, policy: any FaultPolicy, batch: Int, slot: Int, cpu: Int?,
          options: FaultHandler.Options, sink: HandlerSink, service: HandlerService? = nil) {
        self.index = index
        self.service = service
        self.files = files
        self.ready = ready
        self.deferred = deferred
        self.features = features
        self.userModeOnly = userModeOnly
        self.policy = policy
        self.batch = batch
        self.cpu = cpu
        self.fallback = options.fallback.rawValue
        self.spinPolls = options.spinPolls
        self.name = "\(options.threadName)-\(index)"
        self.sink = sink
        self.startHook = options.readerStartHook
        self.basePage = basePageSize
        self.pageMask = ~(UInt(basePage) - 1)
        self.exact = features.contains(.exactAddress)
        self.threadIDs = features.contains(.threadID)
        // Room for one full read plus the loop's deferred retries.
        let slots = 2 * Int(CUFFD_MAX_BATCH)
        if slot > 0 {
            let len = slot * slots
            let p = mmap(nil, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            guard let p, p != MAP_FAILED else { return nil }
            scratch = p
            scratchLength = len
        } else {
            scratch = nil
            scratchLength = 0
        }
        var ctx = FaultContext(fd: files?.uffd ?? -1, features: features, reader: index, scratchBase: scratch, slotSize: slot)
        ctx.deferredTable = deferred
        context = ctx
        loopStats = .allocate(capacity: 1)
        loopStats.initialize(to: cuffd_loop_stats())
        pendingErrors.reserveCapacity(Int(CUFFD_MAX_BATCH) * 2)
    }

    deinit {
        if let scratch { munmap(scratch, scratchLength) }
        loopStats.deallocate()
    }

    func run() {
        if let cpu { _ = cuffd_pin_self(Int32(cpu)) }
        _ = cuffd_set_thread_name(name)
        service?.markNoWait()
        startHook?()
        guard let files else { return }
        var cfg = cuffd_loop_config()
        cfg.uffd = files.uffd
        cfg.stop_fd = files.stop
        cfg.batch = UInt32(batch)
        cfg.fallback = fallback
        cfg.features = features.rawValue
        cfg.spin_polls = spinPolls
        cfg.decide = decideTrampoline
        cfg.complete = completeTrampoline
        cfg.ctx = Unmanaged.passUnretained(self).toOpaque()
        cfg.deferred = deferred?.raw
        warmUp()
        // Tell start() this thread is past its start-up (which may allocate; see start()).
        ready?.signal()
        let rc = cuffd_loop_run(&cfg, loopStats)
        if rc < 0 { sink.reportLoop(UffdError(.faultLoop, rc: rc, detail: name)) }
        published.withLock { $0.loop = loopStats.pointee }
        // The files close when the last reader of the run (and the handler) let go of them.
    }

    /// Runs this reader's own fault-path code once, with no effect, before the thread reports
    /// ready. The Swift runtime instantiates generic metadata (the histogram's, the mutexes',
    /// the records') the first time code needs it, and that allocates: done for the first time
    /// while a fork waits for this reader, it deadlocks (see HandlerService). The policy's own
    /// first calls are the policy's affair.
    @inline(never)
    func warmUp() {
        var h = HandlerStats.makeHistogram()
        _ = h.record(Swift.min(UInt64(basePage), h.highestTrackableValue))
        _ = h.record(h.highestTrackableValue)
        published.withLock { p in _ = p.loop.reads }
        pendingErrors.append((-1, UffdError(.handler, .ioError, detail: "warm-up")))
        _ = pendingErrors.first(where: { $0.0 == -1 })
        pendingErrors.removeAll(keepingCapacity: true)
        var ctx = context
        ctx.batchIndex = 0
        ctx.message = nil
        var ev = uffd_msg()
        ev.event = UInt8(UFFD_EVENT_REMOVE)
        _ = Event(ev, features: features, userModeOnly: userModeOnly)
        var m = uffd_msg()
        m.event = UInt8(UFFD_EVENT_PAGEFAULT)
        var r = cuffd_resolution()
        r.op = Resolution.Operation.fail.rawValue
        _ = Fault(m, pageMask: pageMask, exact: exact, threadIDs: threadIDs)
        _ = Resolution(Resolution.Operation(rawValue: r.op) ?? .fail, start: UInt(r.dst), length: Int(r.len),
                       source: UInt(r.src), mode: r.mode)
        _ = Errno(rawValue: r.error)
        var rec = HandlerService.Record()
        rec.msg = m
        rec.res = r
        _ = withUnsafeBytes(of: &rec) { $0.count }
        _ = errorSlots.withLock { $0.take(-1) }
        let u = Unmanaged.passRetained(self)
        u.release()
    }

    /// Fills `res[i]` for each fault of the batch; events go to the policy in order.
    @inline(__always)
    func decide(_ msgs: UnsafePointer<uffd_msg>, _ res: UnsafeMutablePointer<cuffd_resolution>, _ n: Int) {
        var ctx = context
        for i in 0..<n {
            if msgs[i].event == UInt8(UFFD_EVENT_PAGEFAULT) {
                let fault = Fault(msgs[i], pageMask: pageMask, exact: exact, threadIDs: threadIDs)
                ctx.batchIndex = i
                // Where a deferred resolution plugs in: `deferFill` claims the fault's range
                // in the run's table from this message.
                ctx.message = msgs + i
                do {
                    let r = try policy.resolve(fault, context: ctx)
                    res[i].op = r.operation.rawValue
                    if r.length == 0 {
                        res[i].dst = UInt64(fault.address)
                        res[i].len = UInt64(basePage)
                    } else {
                        res[i].dst = UInt64(r.start)
                        res[i].len = UInt64(r.length)
                    }
                    res[i].src = UInt64(r.source)
                    res[i].mode = r.mode
                } catch {
                    res[i].op = Resolution.Operation.fail.rawValue
                    pendingErrors.append((i, error))
                }
            } else {
                deliver(msgs[i], ctx)
            }
        }
    }

    /// Events other than fork go to the policy here, in order with the faults. A fork event
    /// goes to the service thread: decoding it allocates (the child fd becomes a `Userfaultfd`,
    /// its handler threads), and the next fork may hold the malloc locks while it waits for
    /// this reader to read its event (see ``HandlerService``).
    @inline(never)
    func deliver(_ m: uffd_msg, _ ctx: FaultContext) {
        if m.event == UInt8(UFFD_EVENT_FORK), let service {
            var r = HandlerService.Record()
            r.kind = HandlerService.Record.Kind.fork.rawValue
            r.msg = m
            r.target = Unmanaged.passRetained(self).toOpaque()
            if service.post(&r) { return }
            Unmanaged<Reader>.fromOpaque(r.target!).release()
        }
        let event = Event(m, features: features, userModeOnly: userModeOnly)
        policy.handle(event: event, context: ctx)
        if case .fork(let child) = event { sink.adopt(child: child, policy: policy) }
    }

    /// On the service thread: a fork event this reader read.
    func deliverFork(_ m: uffd_msg) {
        let event = Event(m, features: features, userModeOnly: userModeOnly)
        policy.handle(event: event, context: context)
        if case .fork(let child) = event { sink.adopt(child: child, policy: policy) }
    }

    /// On the service thread: a failure this reader resolved with the fallback (or could not).
    func reportFailure(_ m: uffd_msg, _ r: cuffd_resolution, slot: Int32) {
        let error = slot >= 0 ? errorSlots.withLock { $0.take(slot) } : nil
        sink.report(m, r, features: features, policyError: error)
    }

    /// Publishes counters and latencies of the batch; reports failures. Also called by the
    /// loop with deferred fetches that missed their deadline (op DEFER, error ETIMEDOUT).
    @inline(__always)
    func complete(_ msgs: UnsafePointer<uffd_msg>, _ res: UnsafePointer<cuffd_resolution>, _ n: Int) {
        var failed = false
        published.withLock { p in
            p.loop = loopStats.pointee
            for i in 0..<n where res[i].op != 0 && res[i].outcome != 0 {
                let o = res[i].outcome
                // A kept fault (EAGAIN) has not ended: the policy hears that its decision did
                // not happen, the owner hears nothing yet (at most one report per fault, when
                // it ends).
                if o == UInt32(CUFFD_OUTCOME_RETRY.rawValue) {
                    failed = true
                    continue
                }
                // A deferred fault waits on: its latency is not this batch's.
                if o == UInt32(CUFFD_OUTCOME_DEFERRED.rawValue) { continue }
                // Clamped: growing the histogram allocates (see the fork notes of FaultHandler),
                // and an expiry's latency is the whole deadline, which may exceed its range.
                _ = p.latency.record(Swift.min(res[i].end_ns &- res[i].start_ns, p.latency.highestTrackableValue))
                if o == UInt32(CUFFD_OUTCOME_FALLBACK.rawValue) || o == UInt32(CUFFD_OUTCOME_FAILED.rawValue) { failed = true }
            }
        }
        // A policy error always ends as FALLBACK or FAILED (op .fail makes the loop apply the
        // fallback), so `failed` covers pendingErrors too; reading pendingErrors here (a class
        // var) would cost a dynamic exclusivity check per batch.
        if failed { reportFailures(msgs, res, n) }
    }

    @inline(never)
    func reportFailures(_ msgs: UnsafePointer<uffd_msg>, _ res: UnsafePointer<cuffd_resolution>, _ n: Int) {
        for i in 0..<n {
            let o = res[i].outcome
            let kept = o == UInt32(CUFFD_OUTCOME_RETRY.rawValue)
            guard kept || o == UInt32(CUFFD_OUTCOME_FALLBACK.rawValue) || o == UInt32(CUFFD_OUTCOME_FAILED.rawValue) else { continue }
            // The policy undoes what it marked when it decided (e.g. a granule "moving"), once
            // per decision: a kept fault is decided again next round.
            let r = res[i]
            let fault = Fault(msgs[i], pageMask: pageMask, exact: exact, threadIDs: threadIDs)
            let resolution = Resolution(Resolution.Operation(rawValue: r.op) ?? .fail, start: UInt(r.dst),
                                        length: Int(r.len), source: UInt(r.src), mode: r.mode)
            var ctx = context
            ctx.batchIndex = i
            policy.failed(fault, resolution: resolution, errno: Errno(rawValue: r.error), context: ctx)
            if kept { continue }
            let policyError = pendingErrors.first(where: { $0.0 == i })?.1
            // The report allocates (the log, the callback): the service thread makes it.
            if let service {
                var rec = HandlerService.Record()
                rec.kind = HandlerService.Record.Kind.failure.rawValue
                rec.msg = msgs[i]
                rec.res = r
                if let policyError { rec.slot = errorSlots.withLock { $0.put(policyError) } }
                rec.target = Unmanaged.passRetained(self).toOpaque()
                if service.post(&rec) { continue }
                // The service is far behind: reporting here could deadlock with a fork (see
                // HandlerService); count it, the handler says how many at stop().
                Unmanaged<Reader>.fromOpaque(rec.target!).release()
                if rec.slot >= 0 { _ = errorSlots.withLock { $0.take(rec.slot) } }
                sink.droppedReports.add(1, ordering: .relaxed)
                continue
            }
            sink.report(msgs[i], r, features: features, policyError: policyError)
        }
        pendingErrors.removeAll(keepingCapacity: true)
    }

    func merge(into s: inout HandlerStats) {
        published.withLock { p in
            s.add(p.loop)
            s.latency.add(p.latency)
        }
    }
}
