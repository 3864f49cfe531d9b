#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import SystemPackage

/// Chooses listener ports the way the official engine does: random in
/// [MC_MIN_RPC_PORT, MC_MAX_RPC_PORT] (default 15000-17000), up to 500 tries.
enum PortAllocator {
    /// Binds a listener on `host` at `required` when given (an error when it cannot), else at
    /// `preferred` when given and free, else at a random port of the range.
    static func listen(host: String, preferred: UInt16?, required: UInt16? = nil, range: ClosedRange<UInt16>) throws -> (socket: Socket, preferredTaken: Error?) {
        if let required, required != 0 {
            do { return (try Socket.listen(host: host, port: required), nil) } catch {
                throw EngineError.invalidConfiguration("cannot listen on the requested rpc port \(required) of '\(host)': \(error)")
            }
        }
        guard let preferred, preferred != 0 else { return (try listen(host: host, range: range), nil) }
        do { return (try Socket.listen(host: host, port: preferred), nil) } catch {
            // Only a port in use moves to another; any other failure (bad address, no
            // permission) would fail at every port as well.
            guard case SocketError.system(_, let errno) = error, errno == .addressInUse else { throw error }
            return (try listen(host: host, range: range), error)
        }
    }

    /// Binds a listener on `host` at a random port of the range.
    static func listen(host: String, range: ClosedRange<UInt16>, attempts: Int = 500) throws -> Socket {
        var lastError: Error = EngineError.invalidConfiguration("empty port range")
        for _ in 0..<attempts {
            let port = UInt16.random(in: range)
            do { return try Socket.listen(host: host, port: port) } catch { lastError = error }
            if case SocketError.resolve = lastError { break }
        }
        throw EngineError.invalidConfiguration("cannot bind a listener on '\(host)' in ports \(range.lowerBound)-\(range.upperBound): \(lastError)")
    }
}
