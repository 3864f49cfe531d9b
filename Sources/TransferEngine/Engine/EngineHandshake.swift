/// The handshake port's side of the engine: notifications, probes, and the answers it gives peers.
extension TransferEngine {
    /// Notifications dropped because the queue was full (the oldest go first).
    public var droppedNotifications: UInt64 { state.withLock { $0.notifications.dropped } }

    /// Notifications received since the last call.
    public func takeNotifications() -> [TransferNotification] {
        state.withLock { $0.notifications.takeAll() }
    }

    /// Sends a notification to an opened segment's handshake port.
    public func sendNotification(_ notification: TransferNotification, to handle: SegmentHandle) throws {
        let peer = try self.peer(handle)
        let body = JSONValue.object(["name": .string(notification.name), "notify_msg": .string(notification.message)]).compactText
        let reply = try HandshakeClient.exchange(host: handle == 0 ? bindHost : peer.host, port: peer.rpcPort,
                                                 message: .init(kind: .notify, json: body), timeouts: handshakeTimeouts)
        guard let message = (try? JSONValue.parse(reply.json))?["notify_msg"]?.stringValue, !message.isEmpty else {
            throw EngineError.transferFailed("peer \(peer.name) did not acknowledge the notification")
        }
    }

    /// Sends `notification` to `segment` once every task of the batch has finished
    /// (submitTransferWithNotify). Returns at once; the wait runs on its own thread.
    public func notifyWhenDone(batch id: BatchID, segment: SegmentHandle, notification: TransferNotification) throws {
        let batch = try self.batch(id)
        let timeout = syncTimeout(bytes: 0) * 4
        try OSThread.spawn(name: "te-notify") { [weak self] in
            guard batch.waitAll(deadline: MonotonicClock.nanoseconds() + timeout), let self else { return }
            do { try self.sendNotification(notification, to: segment) } catch {
                self.logger.warning("notification '\(notification.name)' after batch \(id) was not delivered: \(error)")
            }
        }
    }

    /// Sends a Probe to a segment's handshake port (liveness check, as SGLang uses it). The
    /// port is found as for opening the segment: from the P2P name or the peer's rpc_meta entry.
    public func probe(segmentName name: String) throws {
        let target = name == segmentName ? (host: bindHost, port: rpcPort) : try handshakeAddresses.resolve(name)
        let reply: HandshakeWire.Message
        do {
            reply = try HandshakeClient.exchange(host: target.host, port: target.port, message: .init(kind: .probe, json: "{}"),
                                                 timeouts: handshakeTimeouts)
        } catch {
            throw EngineError.segmentUnavailable(name: name, reason: "probe of \(target.host):\(target.port): \(error)")
        }
        guard (try? JSONValue.parse(reply.json))?["status"]?.stringValue == "success" else {
            throw EngineError.transferFailed("probe of \(name) answered \(reply.json)")
        }
    }

    /// What the handshake port's I/O thread answers itself, without waking a worker: a probe, and
    /// a descriptor fetch while describing this segment is cheap (TCP only, at most 64 buffers:
    /// no plugin call, a reply of a few KiB). Nil hands the request to a worker.
    func answerHandshakeInline(_ message: HandshakeWire.Message) -> String? {
        switch message.kind {
        case .probe: return #"{"status":"success"}"#
        case .metadata: return inlineDescriptorText(maxBuffers: 64)
        default: return nil
        }
    }

    /// Answers one handshake-port message.
    func answerHandshake(_ message: HandshakeWire.Message) -> String? {
        switch message.kind {
        case .metadata:
            return localDescriptorText
        case .probe:
            return #"{"status":"success"}"#
        case .notify:
            guard let body = try? JSONValue.parse(message.json) else { return nil }
            let notification = TransferNotification(name: body["name"]?.stringValue ?? "", message: body["notify_msg"]?.stringValue ?? "")
            let (dropped, report): (Int, UInt64?) = state.withLock { state in
                let dropped = state.notifications.append(notification)
                guard dropped > 0, state.notifications.dropWarnings.record(now: MonotonicClock.nanoseconds()) != nil else { return (dropped, nil) }
                return (dropped, state.notifications.dropped)
            }
            metrics?.notificationsQueued.increment()
            if dropped > 0 { metrics?.notificationsDropped.increment(by: dropped) }
            if let report {
                logger.warning("notification queue full (\(settings.notifyMaxCount) notifications, \(settings.notifyMaxBytes) bytes): dropped the oldest; \(report) dropped so far (take them with getNotifs / get_notifies, or raise MC_NOTIFY_MAX_COUNT / MC_NOTIFY_MAX_BYTES)")
            }
            return #"{"name":"","notify_msg":"success"}"#
        case .connection:
            return answerConnection(message.json)
        }
    }
}
