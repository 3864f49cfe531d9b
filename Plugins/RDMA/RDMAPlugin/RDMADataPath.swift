import CRDMAShim
import CTransportABI
import FoundationEssentials
import TransportPluginKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

// Submitting, completing and repairing transfers.

extension RDMAInstance {
    // MARK: Data path

    private func contains(_ base: UInt64, _ length: UInt64, _ address: UInt64, _ size: UInt64) -> Bool {
        address >= base && address - base <= length && size <= length - (address - base)
    }

    /// The next slice of a request with `remaining` bytes left: `MC_SLICE_SIZE`, with a short
    /// tail merged into it, as upstream does (fragment limit slice/4).
    private func sliceLength(remaining: UInt64) -> UInt64 {
        let slice = options.sliceSize
        return remaining > slice && remaining - slice <= slice / 4 ? remaining : min(slice, remaining)
    }

    /// Validates, slices and queues requests; never blocks.
    func submit(_ requests: RequestArray, accepted: inout Int) throws(PluginFailure) {
        guard !devices.isEmpty else { throw PluginFailure(TE_ERR_INTERNAL, "no device is open") }
        // The first slice waits in `lone` and the rest go to per-device lists, made only once a
        // second slice exists: a synchronous transfer's one slice allocates no arrays.
        var lone: (device: Int, part: Part)? = nil
        var perDevice: [[Part]] = []
        // What was accepted goes to the devices, also when a later request is refused.
        defer {
            if let lone { devices[lone.device].enqueue(lone.part) }
            for (index, parts) in perDevice.enumerated() where !parts.isEmpty { devices[index].enqueue(parts) }
        }
        try signal.locked { () throws(PluginFailure) in
            for (i, request) in requests.enumerated() {
                guard let peer = peers[request.peer] else { throw .invalid("unknown peer handle \(request.peer)") }
                guard request.opcode == TE_OP_READ || request.opcode == TE_OP_WRITE, request.length > 0 else {
                    throw .invalid("bad request (opcode \(request.opcode), length \(request.length))")
                }
                // Only inside one buffer the peer published, and only from registered local memory.
                guard let remote = peer.buffers.first(where: { contains($0.address, $0.length, request.remote_addr, request.length) }) else {
                    throw .outOfRange("remote range [0x\(String(request.remote_addr, radix: 16)), +\(request.length)) is outside \(peer.name)'s buffers")
                }
                guard let local = registrations.last(where: { contains($0.address, $0.length, request.local_addr, request.length) }) else {
                    throw .outOfRange("local range [0x\(String(request.local_addr, radix: 16)), +\(request.length)) is not registered memory")
                }
                let candidates = local.candidates
                // A request of one slice (most small ones) needs no parent record: its slice
                // carries the cookie (parent 0) and completes it.
                let single = sliceLength(remaining: request.length) == request.length
                let parentID = single ? 0 : parents.newID()
                var offset: UInt64 = 0
                var pieces = 0
                while offset < request.length {
                    let length = sliceLength(remaining: request.length - offset)
                    let device = candidates[nextDevice % candidates.count]
                    nextDevice &+= 1
                    let connection = peer.connections[device]
                    let part = Part(
                        isWrite: request.opcode == TE_OP_WRITE, local: request.local_addr + offset, length: UInt32(length),
                        lkey: local.lkeys[device], remote: request.remote_addr + offset, rkey: remote.rkeys[connection.peerDevice],
                        parent: parentID, cookie: request.cookie, connection: connection, retries: 0)
                    if lone == nil && perDevice.isEmpty {
                        lone = (device, part)
                    } else {
                        if let first = lone {
                            perDevice = Array(repeating: [], count: devices.count)
                            perDevice[first.device].append(first.part)
                            lone = nil
                        }
                        perDevice[device].append(part)
                    }
                    offset += length
                    pieces += 1
                }
                if !single { parents.open(parentID, cookie: request.cookie, parts: pieces) }
                accepted = i + 1
            }
        }
    }

    /// Slices finished (or failed) on a device.
    func finished(_ parts: [FinishedPart]) {
        signal.locked {
            for part in parts {
                if var retry = part.retry, retry.retries < options.retryCount, !stopping {
                    retry.retries += 1
                    repairQueue.append(retry)
                    repairNeeded.broadcast()
                    continue
                }
                if part.parent == 0 {
                    if part.status != TE_OK, let error = part.error { log(TE_LOG_DEBUG, "rdma: \(error)") }
                    done.complete(part.cookie, status: part.status, bytes: part.status == TE_OK ? part.bytes : 0)
                    continue
                }
                if part.status != TE_OK, let error = part.error { log(TE_LOG_DEBUG, "rdma: \(error)") }
                if let completion = parents.partEnded(part.parent, status: part.status, bytes: part.bytes) { done.append(completion) }
            }
            signal.broadcast()
        }
    }

    /// Rebuilds broken endpoints (a new handshake, new QPs) and posts their failed slices again;
    /// a slice whose peer cannot be reached any more fails.
    func repairLoop() {
        while true {
            let batch = signal.locked { () -> [Part]? in
                while repairQueue.isEmpty && !stopping { repairNeeded.wait(nanoseconds: 100_000_000) }
                if stopping { return nil }
                defer { repairQueue.removeAll() }
                return repairQueue
            }
            guard let batch else { break }
            var failed: [FinishedPart] = []
            var repaired: [ObjectIdentifier: Bool] = [:]
            var perDevice = [[Part]](repeating: [], count: devices.count)
            for part in batch {
                let connection = part.connection
                let key = ObjectIdentifier(connection)
                guard let device = devices.first(where: { candidate in candidate.lock.locked { candidate.connections[connection.peerNicPath] === connection } }) else {
                    failed.append(FinishedPart(parent: part.parent, cookie: part.cookie, status: TE_ERR_PEER_UNREACHABLE, bytes: 0, error: "connection to \(connection.peerNicPath) is gone"))
                    continue
                }
                if repaired[key] == nil {
                    // Through the gate: an open_peer may be establishing this path right now.
                    let rebuilt = device.establishing(connection.peerNicPath, waitNanoseconds: Self.establishWaitNanoseconds,
                                                      reuse: { !$0.current.broken }) {
                        let before = device.lock.locked { connection.current }
                        switch establish(device, peerSegment: connection.peerSegment, peerPath: connection.peerNicPath) {
                        case .success(let endpoint):
                            device.install(endpoint, on: connection)
                            log(TE_LOG_WARNING, "rdma: rebuilt the endpoint \(device.name) -> \(connection.peerNicPath) after a QP error")
                            return .success(connection)
                        case .failure(let failure) where failure.simultaneousOpen:
                            // The peer repairs this path too, and its handshake goes first.
                            return device.awaitPassive(connection.peerNicPath, replacing: before, peerDevice: connection.peerDevice,
                                                       nanoseconds: Self.establishWaitNanoseconds)
                        case .failure(let failure):
                            return .failure(failure)
                        }
                    }
                    switch rebuilt {
                    case .success:
                        repaired[key] = true
                    case .failure(let failure):
                        log(TE_LOG_WARNING, "rdma: cannot rebuild \(device.name) -> \(connection.peerNicPath): \(failure.text)")
                        repaired[key] = false
                    }
                }
                if repaired[key] == true {
                    perDevice[device.index].append(part)
                } else {
                    failed.append(FinishedPart(parent: part.parent, cookie: part.cookie, status: TE_ERR_PEER_UNREACHABLE, bytes: 0,
                                               error: "\(connection.peerNicPath) unreachable after a QP error"))
                }
            }
            for (index, parts) in perDevice.enumerated() where !parts.isEmpty { devices[index].enqueue(parts) }
            if !failed.isEmpty { finished(failed) }
        }
        signal.locked { repairRunning = false; signal.broadcast() }
    }

    /// Hands out finished requests, waiting at most `timeout` for the first.
    func poll(into out: CompletionArray, timeout: UInt64) -> Int {
        if timeout == 0 { for device in devices { device.callerPolled() } }
        var waited = false
        if signal.locked({ done.isEmpty }) {
            for device in devices { device.tryProgress() }
            if timeout > 0 && signal.locked({ done.isEmpty }) {
                if devices.count == 1 && devices[0].callerPolling {
                    // A caller that was polling waits on the CQ itself (one device: one channel).
                    devices[0].waitAsCaller(nanoseconds: timeout)
                    waited = true
                } else {
                    for device in devices { device.callerWaits() }
                }
            }
        }
        return signal.locked {
            if done.isEmpty && timeout > 0 && !waited { signal.wait(nanoseconds: timeout) }
            return done.drain(into: out)
        }
    }
}
