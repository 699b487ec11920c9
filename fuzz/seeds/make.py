#!/usr/bin/env python3
"""Writes the seed inputs in fuzz/seeds/<target>/ (run from anywhere; files are overwritten).

Seeds are small, well-formed inputs in each target's input format (see the target's doc
comment), so that a short run starts from the interesting paths instead of finding them.
The dataplane_inbound target takes a script decoded by `arbitrary`, which is not written by
hand: it has no seeds and starts from nothing.
"""
import base64
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
KEY_A = base64.b64encode(bytes([3] * 32)).decode()
KEY_B = base64.b64encode(bytes([7] * 32)).decode()
# The agent_config target's fixtures (fuzz_targets/agent_config.rs).
PRIVATE = "IV7qqsBi/ViVTOQOqwUkrFpG1qrLDDQ8B2Gju/JnSVY="
PRESHARED = "42THzN3tT9mpis2OSKT+kr3IcGOlvtBMxda6wztZQDM="
PEER = "j5dxhXF7vQSnxBP29ePJX7iOM0A7pbAgGs2pK/byU4Y="


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def frame(msg):
    body = json.dumps(msg, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def relay_record(b):
    return struct.pack(">I", 0x80000000 | len(b)) + b


peer = {"node_id": 2, "name": "vm-2", "public_key": KEY_B, "addresses": ["100.64.0.2/32"],
        "allowed_ips": ["100.64.0.2/32", "10.2.0.0/16"], "endpoints": ["198.18.0.2:51820"],
        "labels": {"provider": "aws"}}
workload = {"id": 1, "name": "chat", "address": "100.64.50.10/32",
            "address6": "fd00::50:10/128", "holder": 2, "generation": 3, "previous": 1,
            "candidates": [1, 2], "grace_ms": 10000, "tags": ["app"]}
delta = {"from_version": 5, "to_version": 6, "upsert": [peer], "remove": [1],
         "upsert_workloads": [workload], "remove_workloads": ["old"]}
hello = {"type": "hello", "protocol": 1, "auth": {"kind": "node", "node_id": 4, "secret": "s"},
         "public_key": KEY_A, "name": "vm-a", "labels": {"provider": "aws"},
         "endpoints": ["198.18.0.1:51820", "[2001:db8::1]:51820"]}
join = {"type": "hello", "protocol": 1, "auth": {"kind": "join_token", "secret": "t0k"},
        "public_key": KEY_A}
welcome = {"type": "welcome", "node_id": 4, "name": "vm-a", "network": "default",
           "network_cidr": "100.64.0.0/10", "addresses": ["100.64.0.4/10"], "node_secret": "x",
           "coordinators": ["198.18.0.9:7443"], "reflect_port": 7444, "relay": True}
full = {"type": "full_map", "version": 5, "peers": [peer], "workloads": [workload]}

# control_frames: mode (bit 0 server, bit 1 records, bit 2 small cap) | pattern | stream
write("control_frames", "client", bytes([0, 5]) + frame(hello) + frame({"type": "full_map_request"})
      + frame({"type": "heartbeat", "seq": 9}))
write("control_frames", "client-records", bytes([2, 11]) + frame(join) + relay_record(bytes(40))
      + frame({"type": "claim", "request": 1, "workload": "chat"})
      + frame({"type": "prepared", "workload": "chat", "generation": 4})
      + frame({"type": "endpoints", "endpoints": ["198.18.0.1:51820"]}))
write("control_frames", "server", bytes([1, 0]) + frame(welcome) + frame(dict(delta, type="delta"))
      + frame(full))
write("control_frames", "server-records", bytes([3, 3]) + frame({"type": "lease", "seq": 9,
      "lease_ms": 1500, "version": 6}) + relay_record(bytes(range(60)))
      + frame({"type": "claim_result", "request": 1, "generation": 4})
      + frame({"type": "prepare", "workload": "chat", "generation": 4})
      + frame({"type": "revoked", "reason": "bye"}))
write("control_frames", "small-cap", bytes([4, 1]) + frame({"type": "full_map_request"})
      + frame(join))

# netmap_delta: the delta's JSON
write("netmap_delta", "delta", json.dumps(delta))
write("netmap_delta", "minimal", json.dumps({"from_version": 5, "to_version": 7}))
write("netmap_delta", "remove", json.dumps({"from_version": 5, "to_version": 6, "remove": [2, 1],
      "upsert": [dict(peer, node_id=1), dict(peer, node_id=1, name="again")],
      "remove_workloads": ["chat"]}))
# The target's map has a policy of version 1 with three rules (fuzz_targets/netmap_delta.rs).
rule = {"line": 9, "from": ["tag:web"], "to": ["workload:chat"], "ports": ["tcp:80-90", "icmp"]}
write("netmap_delta", "policy-set", json.dumps({"from_version": 5, "to_version": 6,
      "policy": {"set": {"version": 2, "rules": [rule]}}}))
write("netmap_delta", "policy-clear", json.dumps({"from_version": 5, "to_version": 6,
      "policy": "clear"}))
# The digest is the fuzzer's to guess; the target tries a fitting script with the right one.
write("netmap_delta", "policy-edit", json.dumps({"from_version": 5, "to_version": 6,
      "policy": {"edit": {"base": 1, "version": 2, "digest": 0, "ops": [
          {"keep": {"count": 1}}, {"drop": {"count": 1}}, {"add": {"rules": [rule]}},
          {"keep": {"count": 1, "shift": 2}}]}}}))

# join_token: the token text, or addresses\0...\0fingerprint\0secret
tok = {"c": "198.18.1.1:7443", "cs": ["198.18.2.1:7443", "c.example.net:7443"],
       "f": "ab" * 32, "s": "sekret"}
write("join_token", "token", "mlj1_" + base64.urlsafe_b64encode(
    json.dumps(tok, separators=(",", ":")).encode()).decode().rstrip("="))
write("join_token", "fields", "198.18.1.1:7443\0 198.18.2.1:7443\0\0" + "cd" * 32 + "\0sekret")

# disco: mode | bytes
tx = bytes(range(12))
write("disco", "reflect-request", bytes([0]) + b"MLstn\x01\x01" + tx)
write("disco", "reflect-response", bytes([0]) + b"MLstn\x01\x02" + tx + bytes([4, 198, 51, 100, 7])
      + struct.pack(">H", 40000))
write("disco", "sealed-ping", bytes([1]) + bytes(24) + bytes([1]) + tx)
write("disco", "sealed-pong6", bytes([1]) + bytes(range(24)) + bytes([2]) + tx + bytes([6])
      + bytes(range(16)) + struct.pack(">H", 51820))
write("disco", "fields", bytes([2]) + tx + bytes([1]) + bytes(range(16)))

# relay_frames: mode | bytes
def relay_step(delay, peer, id_, index, count, payload):
    return bytes([delay, peer, id_, index, count, len(payload)]) + payload
write("relay_frames", "sequence", bytes([0]) + relay_step(0, 0, 1, 1, 2, b"world")
      + relay_step(1, 0, 1, 0, 2, b"hello ") + relay_step(0, 1, 2, 0, 1, b"whole")
      + relay_step(120, 2, 3, 0, 3, b"late") + relay_step(0, 2, 3, 2, 3, b"x"))
write("relay_frames", "frame", bytes([1]) + bytes([5] * 32) + struct.pack(">H", 9) + bytes([0, 2])
      + b"payload")
write("relay_frames", "cut", bytes([2]) + struct.pack(">H", 80) + struct.pack(">H", 7) + bytes([3])
      + bytes(range(200)))

# uapi_set: the body of a set=1 request (the target's device has key 1, peers 2 and 3)
def pub_hex(seed):
    # Not computed here (X25519): peers by public key are new peers, which is fine for seeds.
    return bytes([seed] * 32).hex()
write("uapi_set", "add-peer", "listen_port=51821\nfwmark=7\npublic_key=" + pub_hex(4)
      + "\npreshared_key=" + pub_hex(5) + "\nendpoint=[2001:db8::4]:51820\n"
      "persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.4.0.1/16\n"
      "allowed_ip=100.64.0.2/32\nprotocol_version=1\n")
write("uapi_set", "replace", "private_key=" + pub_hex(6) + "\nreplace_peers=true\npublic_key="
      + pub_hex(4) + "\nendpoint=198.18.0.4:51820\nallowed_ip=0.0.0.0/0\npublic_key=" + pub_hex(5)
      + "\nupdate_only=true\n")
write("uapi_set", "remove", "public_key=" + pub_hex(4) + "\nremove=true\nfwmark=0\n")

# uapi_socket: what a client writes on one connection
write("uapi_socket", "get", "get=1\n\n")
write("uapi_socket", "set-then-get", "set=1\nlisten_port=5\npublic_key=" + pub_hex(4)
      + "\nallowed_ip=100.64.0.2/32\n\nget=1\n\nget=meshlink\n\n")
write("uapi_socket", "claims", "claim=chat\n\nclaim=odd\n\n\nbogus=1\n\n")
write("uapi_socket", "refused", "set=1\nlisten_port=1\n\nget=1\nx=y\n\n")
write("uapi_socket", "port-in-use", "set=1\nlisten_port=2\n\nclaim=abc\n\nclaim=abcde\n\n")
write("uapi_socket", "handover", "handover=chat\n\nhanded_over=chat\ngeneration=4\n"
      "error=busy\n\nhanded_over=other\ngeneration=1\n\n")

# agent_config: flags (bit 0 wg-quick, bits 1-2 name) | env set | env values | overrides | file
write("agent_config", "wg-quick", bytes([1, 0, 0, 0]) + f"""[Interface]
PrivateKey = {PRIVATE}
ListenPort = 51820
Address = 100.64.0.1/24, fd7a:6d65:7368::1/64
MTU = 1420
FwMark = 0x20

[Peer]
PublicKey = {PEER}
PresharedKey = {PRESHARED}
Endpoint = 192.0.2.10:51820
AllowedIPs = 100.64.0.2/32, 10.20.0.0/16
AllowedIPs = fd7a:6d65:7368::2/128
PersistentKeepalive = 25

[Peer]
PublicKey = {KEY_B}
Endpoint = [2001:db8::20]:51820
""".encode())
write("agent_config", "wg-quick-env", bytes([3, 0x7f, 0x55, 0x0f]) + f"""# comment
[interface]
privatekey={PRIVATE} # trailing
[peer]
publickey = {PEER}
endpoint = peer.example:51820
""".encode())
write("agent_config", "toml", bytes([0, 0, 0, 0]) + f"""interface = "mesh0"
private_key_file = "key"
listen_port = 51820
addresses = ["100.64.0.1/24", "fd7a:6d65:7368::1/64"]
mtu = 1420
fwmark = 0
uapi_dir = "uapi"

[[peers]]
public_key = "{PEER}"
endpoint = "192.0.2.10:51820"
allowed_ips = ["100.64.0.2/32", "fd7a:6d65:7368::2/128"]
persistent_keepalive = 25

[[peers]]
public_key = "{KEY_B}"
endpoint = "[2001:db8::20]:51820"
allowed_ips = ["100.64.0.3/32", "10.20.0.0/16"]
preshared_key_file = "psk"
""".encode())
write("agent_config", "toml-env", bytes([0, 0x22, 0x00, 0x10]) + b'listen_port = 70000\n')

# coordinator_config: overrides set | values | file
write("coordinator_config", "full", bytes([0, 0]) + b"""state_dir = "state"
listen = "0.0.0.0:7443"
admin_listen = "127.0.0.1:7444"
admin_insecure = false
advertise = "coord.example:7443"
coordinators = ["coord.example:7443", "[2001:db8::9]:7443"]
store = "postgres://meshlink:secret@db.example:5432/meshlink?sslmode=require"
reflect_listen = "off"
relay = "on"
relay_rate = 25000000
hello_timeout_secs = 10
message_rate = 20
message_burst = 100
session_queue = 256
max_connections = 10000
idle_timeout_secs = 30
workload_lease_ms = 1500
workload_grace_ms = 10000
""")
write("coordinator_config", "overrides", bytes([0xff, 0xaa]) + b'relay = true\nlisten = "[::]:65535"\n')
write("coordinator_config", "store", bytes([0, 0]) + b"postgres://u:pw@h:1/db")
