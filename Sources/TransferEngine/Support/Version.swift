/// The engine's version, the single place it is defined (packaging reads it too).
public enum TransferEngineVersion {
    /// Semantic version of this release.
    public static let string = "0.1.0"
}
