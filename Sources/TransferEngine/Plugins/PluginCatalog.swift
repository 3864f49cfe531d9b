#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CTransferEngineShims

/// Finds plugin files: `MC_TRANSPORT_PLUGIN_PATH` (colon-separated) first,
/// then directories relative to the image holding this library, then the
/// system plugin directory that the packages install to.
public struct PluginCatalog: Sendable {
    /// The system plugin directory.
    public static let systemDirectory = "/usr/lib/transfer-engine/plugins"
    /// File name pattern: libtransport_<protocol>.so.
    public static let filePrefix = "libtransport_"

    /// The protocol a plugin file is named after (`libtransport_<protocol>.so`, any directory), or nil.
    public static func protocolName(ofFile path: String) -> String? {
        let name = path.split(separator: "/").last.map(String.init) ?? path
        guard name.hasPrefix(filePrefix), name.hasSuffix(".so"), name.count > filePrefix.count + 3 else { return nil }
        return String(name.dropFirst(filePrefix.count).dropLast(3))
    }

    /// Directories searched, in order.
    public let directories: [String]

    /// Builds the search path from the environment.
    public init(environment: [String: String]) {
        var directories: [String] = []
        if let path = environment["MC_TRANSPORT_PLUGIN_PATH"] {
            directories += path.split(separator: ":").map(String.init).filter { !$0.isEmpty }
        }
        if let image = Self.imageDirectory() {
            directories.append(image)  // development builds: plugins next to the binary
            directories.append(image + "/../lib/transfer-engine/plugins")
            directories.append(image + "/transfer-engine/plugins")
        }
        directories.append(Self.systemDirectory)
        var seen = Set<String>()
        self.directories = directories.filter { seen.insert($0).inserted }
    }

    /// Creates a catalog over explicit directories.
    public init(directories: [String]) { self.directories = directories }

    /// Every plugin file found, first directory first; a protocol found twice keeps the first.
    public func pluginFiles() -> [(protocolName: String, path: String)] {
        var result: [(String, String)] = []
        var seen = Set<String>()
        for directory in directories {
            for name in Self.list(directory).sorted() {
                guard let protocolName = Self.protocolName(ofFile: name) else { continue }
                guard !protocolName.isEmpty, seen.insert(protocolName).inserted else { continue }
                result.append((protocolName, directory + "/" + name))
            }
        }
        return result
    }

    /// The file for `protocolName`, if present.
    public func file(for protocolName: String) -> String? {
        pluginFiles().first { $0.protocolName == protocolName }?.path
    }

    private static func list(_ directory: String) -> [String] {
        guard let dir = opendir(directory) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(cString: raw.bindMemory(to: CChar.self).baseAddress!)
            }
            names.append(name)
        }
        return names
    }

    /// Directory of the executable or shared library that contains this code.
    static func imageDirectory() -> String? {
        let anchor = unsafeBitCast(imageDirectoryAnchor as @convention(c) () -> Void, to: UnsafeRawPointer.self)
        guard let file = te_image_path(anchor) else { return nil }
        var resolved = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let path = realpath(file, &resolved) != nil
            ? String(decoding: resolved.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) : String(cString: file)
        guard let slash = path.lastIndex(of: "/") else { return nil }
        return String(path[..<slash])
    }
}

private let imageDirectoryAnchor: @convention(c) () -> Void = {}
