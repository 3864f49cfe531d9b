/// Texts a plugin must survive where it reads JSON from the host or from a peer: malformed,
/// truncated, deeply nested, huge numbers, wrong types and very long strings.
enum HostileJSON {
    /// Generic hostile documents.
    static let documents: [String] = [
        "", " ", "{", "}", "[]", "null", "true", "0", "\"text\"", "{\"a\":", "{\"buffers\":", "{\"buffers\":[{\"addr\":1",
        "{\"buffers\":5}", "{\"buffers\":[5,\"x\",null,[]]}", "{\"buffers\":[{}]}",
        "{\"buffers\":[{\"name\":\"b\",\"addr\":-1,\"length\":-1}]}",
        "{\"buffers\":[{\"name\":\"b\",\"addr\":18446744073709551615,\"length\":18446744073709551615}]}",
        "{\"buffers\":[{\"name\":\"b\",\"addr\":1e308,\"length\":1e308}]}",
        "{\"buffers\":[{\"name\":\"b\",\"addr\":99999999999999999999999999,\"length\":1}]}",
        "{\"devices\":\"x\",\"priority_matrix\":[],\"buffers\":{}}",
        "{\"devices\":[{\"name\":5,\"lid\":\"x\",\"gid\":[]}],\"buffers\":[{\"name\":\"b\",\"addr\":4096,\"length\":4096,\"rkey\":\"x\",\"lkey\":{}}]}",
        String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000),
        String(repeating: "{\"a\":", count: 50_000) + "1" + String(repeating: "}", count: 50_000),
        "{\"name\":\"" + String(repeating: "x", count: 1 << 20) + "\"}",
        "{\"\u{0}\":\"\u{0}\",\"\u{FFFF}\":1}",
    ]

    /// Options texts for probe and create (nil: a NULL pointer).
    static let options: [String?] = [nil] + documents.prefix(12).map { Optional($0) } + [
        "{\"device_name\":5,\"options\":[]}", "{\"options\":{\"MC_SLICE_SIZE\":\"-1\",\"MC_MAX_WR\":\"99999999999999999999\"}}",
        "{\"protocol\":[],\"device_name\":{},\"options\":{\"x\":5}}",
    ]

    /// Documents built from a plugin's own descriptor keys with their values replaced by wrong
    /// types and extreme numbers, inside a plausible segment descriptor.
    static func mutations(of fragment: [String: JSONValue], buffer: [String: JSONValue]) -> [String] {
        let wrong: [JSONValue] = [.string("x"), .int(-1), .uint(UInt64.max), .double(1e308), .array([]), .object([:]), .null, .bool(true),
                                  .array([.string("x"), .int(-1)]), .string(String(repeating: "9", count: 4096))]
        var out: [String] = []
        func segment(_ extra: [String: JSONValue], _ bufferExtra: [String: JSONValue]) -> String {
            var object = extra
            object["name"] = .string("checked-peer")
            object["protocol"] = .string("x")
            object["tcp_data_port"] = .uint(1)
            var entry = bufferExtra
            entry["name"] = .string("cpu:0")
            entry["addr"] = .uint(0x10000)
            entry["length"] = .uint(4096)
            object["buffers"] = .array([.object(entry)])
            return JSONValue.object(object).compactText
        }
        out.append(segment(fragment, buffer))
        for key in fragment.keys.sorted() where key != "buffers" {
            for value in wrong {
                var changed = fragment
                changed[key] = value
                out.append(segment(changed, buffer))
            }
        }
        for key in buffer.keys.sorted() {
            for value in wrong {
                var changed = buffer
                changed[key] = value
                out.append(segment(fragment, changed))
            }
        }
        return out
    }
}
