#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension MemoryRegistry {
    /// Moves a request between two ranges of this engine's own host memory (a transfer to its own
    /// segment, as Mooncake Store's local copies are) with one memmove, both ranges pinned for
    /// the copy; nil when either range is not registered host memory (the request then goes to
    /// a transport, e.g. a plugin for device memory). No network, no transport: the fastest path,
    /// and one no transport's self-connection quirks can break.
    func copyLocally(_ request: TransferRequest) -> Bool {
        let (source, destination) = request.operation == .write
            ? (request.localAddress, request.remoteAddress) : (request.remoteAddress, request.localAddress)
        let copied: Bool? = withRegistered(address: source, length: request.length) {
            withRegistered(address: destination, length: request.length) {
                memmove(UnsafeMutableRawPointer(bitPattern: UInt(destination))!, UnsafeRawPointer(bitPattern: UInt(source))!, Int(request.length))
                return true
            } ?? false
        }
        return copied == true
    }

    /// Whether both ranges of a request to the own segment are registered host memory.
    func isLocalHostCopy(_ request: TransferRequest) -> Bool {
        guard let local = region(containing: request.localAddress, length: request.length), local.hostAccessible,
              let remote = region(containing: request.remoteAddress, length: request.length), remote.hostAccessible else { return false }
        return true
    }
}
