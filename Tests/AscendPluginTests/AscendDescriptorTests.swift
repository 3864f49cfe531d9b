import Testing
import TransportPluginKit
@testable import AscendRankInfo

/// The ascend plugin's CANN-free logic: options, /etc/hccn.conf, rank_info both ways, endpoint pairing.
@Suite("ascend plugin descriptors and options (no NPU needed)")
struct AscendDescriptorTests {
    @Test("options: device_name npu:N or N, local_hostname's host, MC_ASCEND_* settings range-checked")
    func options() throws {
        let parsed = try AscendOptions(json: #"{"device_name":"npu:3","local_hostname":"10.1.2.3:12345","options":{"MC_ASCEND_PORT":"26000","MC_ASCEND_LIBRARY":"/opt/x.so","MC_ASCEND_SERVICE_LEVEL":"5","MC_ASCEND_DEVICE_IP":"192.168.1.9"}}"#)
        #expect(parsed.device == 3 && parsed.hostIP == "10.1.2.3" && parsed.port == 26000 && parsed.hixlLibrary == "/opt/x.so")
        #expect(parsed.serviceLevel == 5 && parsed.deviceIP == "192.168.1.9")
        #expect(try AscendOptions(json: #"{"device_name":"2","local_hostname":"[fe80::1]:5"}"#).hostIP == "fe80::1")
        #expect(try AscendOptions(json: #"{"device_name":"auto-discovery"}"#).device == 0)
        #expect(try AscendOptions(json: nil) == AscendOptions())
        for bad in [#"{"device_name":"cuda:0"}"#, #"{"device_name":"npu:-1"}"#, #"{"options":{"MC_ASCEND_PORT":"70000"}}"#,
                    #"{"options":{"MC_ASCEND_SERVICE_LEVEL":"8"}}"#, #"{"options":{"MC_ASCEND_DEVICE_IP":"npu0"}}"#,
                    #"{"options":{"MC_ASCEND_CONNECT_TIMEOUT_MS":"0"}}"#, "[1]"] {
            #expect(throws: PluginFailure.self, "\(bad)") { try AscendOptions(json: bad) }
        }
    }

    @Test("hccn.conf: address_N for the physical id, IPv4 before IPv6, junk ignored")
    func hccnConf() {
        let text = "address_0=10.0.0.10\nnetmask_0=255.255.255.0\naddress_1 = 10.0.0.11\r\nIPv6address_2=fd00::2\naddress_2=not-an-ip\naddress_3=fd00::3\nIPv6address_4=fd00::4\naddress_4=10.0.0.14\n"
        #expect(HCCNConf.deviceIP(in: text, physicalID: 0) == IPAddress("10.0.0.10"))
        #expect(HCCNConf.deviceIP(in: text, physicalID: 1) == IPAddress("10.0.0.11"))
        #expect(HCCNConf.deviceIP(in: text, physicalID: 2) == IPAddress("fd00::2"))
        #expect(HCCNConf.deviceIP(in: text, physicalID: 3) == nil)  // an IPv6 text under the IPv4 key
        #expect(HCCNConf.deviceIP(in: text, physicalID: 4) == IPAddress("10.0.0.14"))
        #expect(HCCNConf.deviceIP(in: text, physicalID: 10) == nil)
        #expect(HCCNConf.read("/nonexistent/hccn.conf") == nil)
    }

    @Test("our rank_info is upstream's shape and reads back; an upstream peer's descriptor is understood")
    func rankInfo() throws {
        let local = LocalRankInfo(hostIP: "10.1.2.3", port: 26000, logicalID: 1, physicalID: 5, deviceIP: IPAddress("192.168.1.5"), pid: 42)
        let peer = try AscendPeer(json: local.json)
        #expect(peer.serverIP == "10.1.2.3" && peer.serverPort == 26000 && peer.hostIP == "10.1.2.3")
        #expect(peer.endpoints == [AscendEndpoint(kind: .roce, address: IPAddress("192.168.1.5"), physicalID: 5),
                                   AscendEndpoint(kind: .hccs, address: nil, physicalID: 5)])
        for key in ["rankId", "hostIp", "hostPort", "deviceLogicId", "devicePhyId", "deviceType", "deviceIp", "devicePort", "pid", "endpoints"] {
            #expect(local.json.contains("\"\(key)\":"), "\(key)")
        }
        // As upstream's transfer_metadata.cpp writes it (its engine's ADXL endpoint in endpoints).
        let upstream = #"{"name":"10.0.0.1:12345","protocol":"ascend","devices":[{"name":"npu_0","lid":0}],"buffers":[{"name":"npu:0","addr":140000000000,"length":4096,"device_id":0}],"rank_info":{"rankId":0,"hostIp":"10.0.0.1","hostPort":12345,"deviceLogicId":0,"devicePhyId":3,"deviceType":0,"deviceIp":"192.168.0.3","devicePort":0,"pid":77,"endpoints":["10.0.0.1:20000"]}}"#
        let official = try AscendPeer(json: upstream)
        #expect(official.serverIP == "10.0.0.1" && official.serverPort == 20000 && official.endpoints.count == 2)
        // Without endpoints, hostIp:hostPort name the server; an IPv6 endpoint in brackets.
        #expect(try AscendPeer(json: #"{"rank_info":{"hostIp":"10.0.0.2","hostPort":7,"devicePhyId":0}}"#).serverPort == 7)
        #expect(try AscendPeer(json: #"{"rank_info":{"devicePhyId":0,"endpoints":["[fd00::1]:9"]}}"#).serverIP == "fd00::1")
        #expect(LocalRankInfo(hostIP: "fd00::1", port: 9, logicalID: 0, physicalID: 0, deviceIP: nil, pid: 1).json.contains(#""endpoints":["[fd00::1]:9"]"#))
    }

    @Test("hostile rank_info is refused with a reason, never trusted")
    func hostile() {
        let cases = [
            "", "{", "[]", #"{"rank_info":[]}"#, #"{}"#,
            #"{"rank_info":{"hostIp":"10.0.0.1","hostPort":1}}"#,                         // no devicePhyId
            #"{"rank_info":{"devicePhyId":4294967296,"endpoints":["1.2.3.4:5"]}}"#,         // too large
            #"{"rank_info":{"devicePhyId":-1,"endpoints":["1.2.3.4:5"]}}"#,
            #"{"rank_info":{"devicePhyId":0,"endpoints":["1.2.3.4:0"]}}"#,
            #"{"rank_info":{"devicePhyId":0,"endpoints":["1.2.3.4:65536"]}}"#,
            #"{"rank_info":{"devicePhyId":0,"endpoints":["host.example:5"]}}"#,
            #"{"rank_info":{"devicePhyId":0,"endpoints":[7]}}"#,
            #"{"rank_info":{"devicePhyId":0,"hostIp":"10.0.0.1","hostPort":99999}}"#,
            #"{"rank_info":{"devicePhyId":0,"endpoints":["1.2.3.4:5"],"deviceIp":"x"}}"#,
            #"{"rank_info":{"devicePhyId":"0","endpoints":["1.2.3.4:5"]}}"#,
            "{\"rank_info\":{\"devicePhyId\":0,\"endpoints\":[\"" + String(repeating: "1", count: 100_000) + ":5\"]}}",
        ]
        for json in cases {
            #expect(throws: PluginFailure.self, "\(json.prefix(80))") { try AscendPeer(json: json) }
        }
    }

    @Test("pairing: HCCS between NPUs of one host, RoCE across hosts, nothing without a common endpoint")
    func pairing() throws {
        let mine = AscendEndpoint.local(physicalID: 0, deviceIP: IPAddress("192.168.0.1"))
        let sameHost = try AscendPeer(json: #"{"rank_info":{"hostIp":"10.0.0.1","devicePhyId":1,"deviceIp":"192.168.0.2","endpoints":["10.0.0.1:5"]}}"#)
        #expect(sameHost.pair(with: mine, localHostIP: "10.0.0.1")?.remote.kind == .hccs)
        #expect(sameHost.pair(with: mine, localHostIP: "10.0.0.9")?.remote == AscendEndpoint(kind: .roce, address: IPAddress("192.168.0.2"), physicalID: 1))
        let noNIC = try AscendPeer(json: #"{"rank_info":{"hostIp":"10.0.0.2","devicePhyId":1,"endpoints":["10.0.0.2:5"]}}"#)
        #expect(noNIC.pair(with: mine, localHostIP: "10.0.0.1") == nil)
        let v6 = try AscendPeer(json: #"{"rank_info":{"hostIp":"10.0.0.2","devicePhyId":1,"deviceIp":"fd00::2","endpoints":["10.0.0.2:5"]}}"#)
        #expect(v6.pair(with: mine, localHostIP: "10.0.0.1") == nil)
    }
}
