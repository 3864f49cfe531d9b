import TransferEngine

/// The comma lists the benchmark commands take (`--block-sizes`, `--batch-sizes`, `--operation`).
enum BenchLists {
    /// Block sizes such as "4KiB,64KiB".
    static func blocks(_ text: String) throws -> [UInt64] {
        let blocks = try text.split(separator: ",").map { try ByteSize.parse(String($0)) }
        guard blocks.allSatisfy({ $0 > 0 }) else { throw EngineError.invalidArgument("block sizes must be positive") }
        return blocks
    }

    /// Batch sizes such as "1,64", each in 1...`limit`.
    static func batches(_ text: String, limit: Int) throws -> [Int] {
        try text.split(separator: ",").map { item -> Int in
            guard let value = Int(item.trimmingCharacters(in: .whitespaces)), (1...limit).contains(value) else {
                throw EngineError.invalidArgument("batch size '\(item)' (1...\(limit))")
            }
            return value
        }
    }

    /// "read", "write" or "both" (writes first).
    static func operations(_ text: String) -> [TransferRequest.Operation] {
        text == "both" ? [.write, .read] : (text == "read" ? [.read] : [.write])
    }
}
