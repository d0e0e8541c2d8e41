# ruff: noqa: PLC0415  (imports inside functions on purpose: the fuzzer instruments what they load)
"""Write the seed corpora in corpus/<target>/ (committed; rerun after changing this file).

    python tests/fuzz/make_corpus.py

Valid inputs come from the golden vectors in tests/vectors/ (bytes Tailscale's Go code made) and
derpd's own encoders; the rest are the nasty cases by hand: deep nesting, huge numbers and lengths,
truncated headers. Files are named for what they hold. Existing files are overwritten, others kept
(a crash reproducer saved by hand stays).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VECTORS = HERE.parent / "vectors"
CORPUS = HERE / "corpus"


def vector(name: str) -> dict:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def frame(ftype: int, payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BI", ftype, len(payload) if length is None else length) + payload


def session_streams(name: str, limit: int) -> dict[str, bytes]:
    """Each recorded connection's DERP bytes (after its HTTP part), client and server side."""
    out = {}
    for conn in vector(name)["connections"]:
        for side in ("c2s", "s2c"):
            data = b"".join(bytes.fromhex(c["hex"]) for c in conn["chunks"] if c["d"] == side and "hex" in c)
            data = data[conn.get("http", {}).get(f"{side}_http_bytes", 0) :]
            if len(data) >= 5 and conn["kind"] == "derp":
                out[f"session-{name.rsplit('-', 1)[-1].split('.', 1)[0]}-conn{conn['conn']}-{side}"] = data[:limit]
    return out


def client_hello(alpn: list[str] | None, server_name: str | None, tls12: bool = False) -> bytes:
    """The first flight of an OpenSSL client (Python's ssl module over memory BIOs): its ClientHello."""
    import ssl

    ctx = ssl.create_default_context()
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def tls_records(message: bytes, size: int) -> bytes:
    """Handshake bytes in records of ``size`` bytes."""
    return b"".join(
        b"\x16\x03\x01" + struct.pack(">H", len(message[i : i + size])) + message[i : i + size]
        for i in range(0, len(message), size)
    )


def tls_seeds() -> dict[str, bytes]:
    host = "derp.example.com"
    acme = client_hello(["acme-tls/1"], host)
    message = acme[5:]  # OpenSSL sends its hello in one record
    assert len(message) == struct.unpack(">H", acme[3:5])[0]

    def hello(exts: bytes | None) -> bytes:
        body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
        if exts is not None:
            body += struct.pack(">H", len(exts)) + exts
        return tls_records(b"\x01" + len(body).to_bytes(3, "big") + body, 1 << 14)

    alpn_h2 = b"\x00\x10\x00\x05\x00\x03\x02h2"
    return {
        "tls13-sni-acme": acme,
        "tls13-sni-h2": client_hello(["h2", "http/1.1"], host),
        "tls12-sni-acme": client_hello(["acme-tls/1"], host, tls12=True),
        "tls13-nothing": client_hello(None, None),
        "tls13-acme-small-records-then-ccs": tls_records(message, 50) + b"\x14\x03\x03\x00\x01\x01",
        "no-extensions": hello(None),
        "duplicate-alpn": hello(alpn_h2 + alpn_h2),
        "sni-not-ascii": hello(b"\x00\x00\x00\x09\x00\x07\x00\x00\x04b\xc3\xbccher"),
        "length-16MiB": b"\x16\x03\x01\x40\x00\x01\xff\xff\xff",
        "http": b"GET / HTTP/1.1\r\nHost: derp.example.com\r\n\r\n",
        "sslv2": bytes.fromhex("802e0100020015000000100100800700c0") + bytes(16),
    }


def http_head_seeds() -> dict[str, bytes]:
    """The HTTP upgrade's fast path (proto.httphead): real clients' heads and what h11 handles differently."""
    go_upgrade = b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1:33341\r\nUser-Agent: Go-http-client/1.1\r\n"
    go_upgrade += b"Connection: Upgrade\r\nUpgrade: DERP\r\n\r\n"
    return {
        "go-upgrade": go_upgrade,
        "fast-start": go_upgrade[:-2] + b"Derp-Fast-Start: 1\r\n\r\n" + b"\x02\x00\x00\x00\x38" + bytes(56),
        "websocket": b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: derp\r\n\r\n",
        "bare-lf": b"GET /derp HTTP/1.1\nHost: x\n\n",
        "obs-fold": b"GET /derp HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
        "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
        "body": b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        "ows": b"GET /derp?x HTTP/1.1\r\nHost:x\r\nUpgrade: \t DERP \t\r\nX:\r\n\r\n",
        "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "long-value": b"GET / HTTP/1.1\r\nHost: x\r\nX: \x00*\xff\x01a\r\n\r\n",  # expand(): 2048 x "a"
    }


def main() -> None:
    sys.path.insert(0, str(HERE.parents[1]))
    from derpd.net import tls
    from derpd.proto import proxyproto as pp
    from derpd.proto.keys import NodePrivate, key_file_text
    from derpd.tools import derpmap as dm

    frames = vector("derp-frames.json")
    stun = vector("stun.json")
    seeds: dict[str, dict[str, bytes]] = {}

    # --- DERP frames
    key_a, key_b = bytes(range(32)), bytes(range(1, 33))
    disco = b"TS\xf0\x9f\x92\xac" + bytes(32) + bytes(24) + b"disco body"
    client_info = bytes.fromhex(frames["client_frames"][0]["frame_hex"])
    login = [
        frame(4, key_a + b"first"),
        frame(4, key_a + b"second, same key: one run"),
        frame(4, key_a + disco),
        frame(4, key_b + b"another key"),
        frame(7, b"\x01"),
        frame(0x12, b"pingdata"),
        frame(0x10, b""),
        frame(0x11, key_b),
        frame(0x0A, key_a + key_b + b"forwarded"),
        frame(0x06, b""),  # KeepAlive from a client: not handled, skipped
        frame(0x30, b"a frame type from the future"),
    ]
    fr = {
        "client-frames-go": b"".join(bytes.fromhex(f["frame_hex"]) for f in frames["client_frames"]),
        "handshake-then-login": client_info + b"".join(login),
        "handshake-only": client_info,
        "login-frames": b"".join(login),
        "truncated-header": client_info + b"\x04\x00\x00",
        "truncated-payload": client_info + frame(4, key_a + b"cut short")[:20],
        "huge-length-wanted": client_info + frame(4, b"", 0xFFFFFFFF),
        "huge-length-unwanted": client_info + frame(0x20, b"", 0xFFFFFFFF) + frame(4, key_a),
        "clientinfo-too-long": frame(2, b"", (256 << 10) + 1),
        "ping-too-long": client_info + frame(0x12, bytes(1001)),
        "send-short-runs": client_info + frame(4, b"short") + frame(4, b"") + frame(4, key_a) + frame(4, key_a),
        "forward-runs": client_info
        + frame(0x0A, key_a + key_b + b"one")
        + frame(0x0A, key_a + key_b + b"two, same keys: one run")
        + frame(0x0A, key_a + key_b + disco)
        + frame(0x0A, key_b + key_a + b"the other way")
        + frame(0x0A, key_a + key_b[:20])
        + frame(4, key_b + b"a send right after"),
        **session_streams("derp-session-mesh.json", 4096),
        **session_streams("derp-session-http.json", 4096),
    }
    seeds["frame_reader"] = fr
    payloads = {f"type{b[0]:02x}-{i}": b[:1] + b[5:] for i, b in enumerate([*login, client_info])}
    for f in frames["client_frames"]:
        b = bytes.fromhex(f["frame_hex"])
        payloads[f"go-{f['call'].split('(')[0].replace('.', '-')[:30]}"] = b[:1] + b[5:]
    payloads["peer-present-full"] = b"\x09" + key_a + bytes(10) + b"\xff\xff\x0a\x00\x00\x01" + b"\x0d\x96\x01"
    payloads["peer-present-noflags"] = b"\x09" + key_a + bytes(16) + b"\x0d\x96"
    payloads["peer-gone-legacy"] = b"\x08" + key_a
    payloads["restarting"] = b"\x15" + struct.pack(">II", 1000, 60000)
    payloads["health"] = b"\x14problem \xff\xfe not utf-8"
    payloads["server-key"] = (
        bytes.fromhex(frames["server_key_frame_hex"])[:1] + bytes.fromhex(frames["server_key_frame_hex"])[5:]
    )
    seeds["frame_payloads"] = payloads

    # --- JSON documents
    deep = b"[" * 2000
    big = b"1" * 5000
    ci = {f"vector-{s['name']}": s["plaintext"].encode() for s in frames["sealed"]}
    ci["mesh-key"] = frames["mesh_key_json_in_client_info"].encode()
    ci.update(
        {
            "case-folded-and-duplicate": b'{"VERSION":1,"version":2,"canackpings":true,"appname":"x","AppName":"y"}',
            "nulls": b'{"version":null,"meshKey":null,"CanAckPings":null}',
            "wrong-types": b'{"version":"2","CanAckPings":1}',
            "bad-mesh-key": b'{"meshKey":"zz' + b"0" * 62 + b'"}',
            "float-version": b'{"version":1e400}',
            "negative-version": b'{"version":-9223372036854775809}',
            "not-object": b"[1,2,3]",
            "trailing-data": b'{"version":2} {"version":3}',
            "bom": b'\xef\xbb\xbf{"version":2}',
            "nan": b'{"version":NaN}',
            "invalid-utf8": b'{"AppName":"\xff\xfe"}',
            "lone-surrogate": b'{"AppName":"\\ud800"}',
            "kelvin-and-long-s": b'{"\xe2\x84\xaaey":1,"i\xc5\xbfprober":true}',
            "bigint-5000-digits": b'{"version":' + big + b"}",
            "deep-objects": b'{"a":' * 1500 + b"1" + b"}" * 1500,
            "deep-array-2000": deep,  # RecursionError in json.loads (known)
            "brackets-in-strings": b'{"AppName":"[[[[{{{{\\"[[[["}',
        }
    )
    mesh_spaced = frames["mesh_key"][:10] + "  " + frames["mesh_key"][12:]  # 64 characters, 31 bytes
    ci["known-meshkey-with-spaces"] = b'{"meshKey":"' + mesh_spaced.encode() + b'"}'
    seeds["client_info"] = ci
    seeds["admission"] = {
        "allow": b'{"Allow":true}',
        "deny": b'{"Allow":false}',
        "lowercase-last-wins": b'{"Allow":true,"allow":false}',
        "wrong-type": b'{"Allow":"true"}',
        "null": b"null",
        "trailing": b'{"Allow":true}garbage',
        "leading-space": b'  \r\n{"Allow":true}',
        "deep": deep,
        "bigint": b'{"x":' + big + b',"Allow":true}',
        "allowlist": b"# allow\nnodekey:" + frames["client_public_key_hex"].encode() + b"  # laptop\n\n",
        "allowlist-privkey": b"privkey:" + b"ab" * 32 + b"\n",
        "ip": b"::ffff:192.0.2.1",
        "known-allowlist-key-with-spaces": b"nodekey:"
        + frames["client_public_key_hex"][:10].encode()
        + b"  "
        + frames["client_public_key_hex"][12:].encode()
        + b"\n",
    }
    seeds["rate_config"] = {
        "example": b'{"PerClientRateLimitBytesPerSec": 1000000, "PerClientRateBurstBytes": 2000000}',
        "off": b'{"PerClientRateLimitBytesPerSec": 0}',
        "folded": b'{"perclientratelimitbytespersec": 5, "PERCLIENTRATEBURSTBYTES": null}',
        "negative": b'{"PerClientRateLimitBytesPerSec": -1}',
        "float": b'{"PerClientRateLimitBytesPerSec": 1.5}',
        "huge": b'{"PerClientRateLimitBytesPerSec": 99999999999999999999999999}',
        "bigint": big,
        "deep": deep,
    }
    seeds["keys"] = {
        "derper-key-file": frames["derper_key_file"].encode(),
        "key-file-folded": b'{"privatekey":"' + frames["client_private_key"].encode() + b'"}',
        "mesh-key-file": frames["mesh_key_file"].encode(),
        "nodekey": frames["client_public_key"].encode(),
        "privkey": frames["client2_private_key"].encode(),
        "privkey-spaces": b"privkey:" + b"ab " * 21 + b"a",
        "bigint": big,
        "deep": deep,
        "known-nodekey-with-spaces": b"nodekey:" + b"ab" * 30 + b"  ab",  # 64 characters, 31 bytes
        "known-mesh-key-with-spaces": mesh_spaced.encode() + b"\n",
    }
    seeds["gojson"] = {
        **{k: v for k, v in ci.items() if k != "deep-array-2000"},
        "admit": b'{"Allow":true}',
        "key-file": frames["derper_key_file"].encode(),
        "depth-64": b"[" * 64 + b"]" * 64,
        "depth-65": b"[" * 65 + b"]" * 65,
        "escaped-quote-brackets": b'["\\\\", "\\"[[["]',
        "deep": deep,
        "numbers": b"[0,-0,1e5,1E-5,-1.5e+300,9223372036854775807,9223372036854775808]",
    }

    # --- PROXY protocol
    seeds["proxyproto"] = {
        "v1-tcp4": pp.encode_v1(("192.0.2.1", 56324), ("10.0.0.1", 443)) + b"GET / HTTP/1.1\r\n",
        "v1-tcp6": pp.encode_v1(("2001:db8::1", 1), ("::ffff:10.0.0.1", 65535)),
        "v1-unknown": b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nrest",
        "v1-too-long": b"PROXY TCP4 " + b"1" * 100,
        "v1-bare-lf": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        "v2-tcp4": pp.encode_v2(("192.0.2.1", 56324), ("10.0.0.1", 443)) + b"\x16\x03\x01",
        "v2-tcp6-tlvs": pp.encode_v2(
            ("2001:db8::1", 1), ("2001:db8::2", 2), tlvs=[(pp.PP2_TYPE_ALPN, b"h2"), (pp.PP2_TYPE_NOOP, b"")]
        ),
        "v2-local": pp.encode_v2(None, None, command="LOCAL"),
        "v2-unix": pp.V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216),
        "v2-dgram": pp.V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),
        "v2-max-length": pp.V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(12),
        "v2-truncated-signature": pp.V2_SIGNATURE[:7],
        "v2-truncated-tlv": pp.V2_SIGNATURE + b"\x21\x11\x00\x0e" + bytes(12) + b"\x01\x00",
        "http": b"GET /derp HTTP/1.1\r\nHost: x\r\n\r\n",
        "trusted-list": b"10.0.0.0/8,::1/128,192.0.2.7,10.0.0.1/8,fe80::1%eth0",
    }

    seeds["http_head"] = http_head_seeds()

    # --- STUN
    st = {}
    for group in ("binding_requests", "parse_binding_request_cases"):
        for case in stun[group]:
            st[f"req-{case['name']}"] = bytes.fromhex(case["request_hex"])
    for group in ("binding_responses", "parse_response_cases"):
        for case in stun[group]:
            st[f"resp-{case['name']}"] = bytes.fromhex(case["response_hex"])
    for i, ex in enumerate(stun["live_server"]["exchanges"]):
        st[f"live-{i}-request"] = bytes.fromhex(ex["request_hex"])
    st["header-only-huge-length"] = bytes.fromhex("0001ffff2112a442") + bytes(12)
    st["attr-huge-length"] = bytes.fromhex("000100082112a442") + bytes(12) + b"\x80\x22\xff\xff" + bytes(4)
    seeds["stun"] = st

    # --- DERP maps
    region, _ = dm.build_region(
        900, "home", 'My "Region" # 1', [dm.NodeSpec(hostname="derp.example.com", name="900a", ipv4="198.51.100.1")]
    )
    m = dm.DerpMap(regions={900: region, 1: None}, omit_default_regions=True, region_score={900: 0.5})
    yaml_docs = {
        "written-by-derpd": dm.to_headscale_yaml(m).encode(),
        "headscale-example": b"""# comment
regions:
  1: null # Disable DERP region with ID 1
  900:
    regionid: 900
    regioncode: custom
    regionname: My Region
    latitude: 50.1
    longitude: -8.5e-1
    nodes:
      - name: 900a
        regionid: 900
        hostname: myderp.example.com
        ipv4: 198.51.100.1
        ipv6: 2001:db8::1
        stunport: 0
        stunonly: false
        derpport: 0
""",
        "compact-quotes-escapes": b"""---
regions:

  900:
    regionid: 0x384
    regioncode: 'it''s'
    regionname: "Z\\xfcrich \\"HQ\\" # not a comment\\t\\u00e9\\U0001F600"
    nodes:
    - name: "900a"   # trailing comment
      regionid: 900
      hostname: derp.example.com
      certname: 'sha256-raw:abab'
    -
      name: 900b
      regionid: 900
      hostname: derp2.example.com
      stunonly: yes
  901:
    regionid: 901
    regioncode: b
    regionname:
    nodes: []
homeparams:
  regionscore: {}
""",
        "camel-case-keys": b"regions:\n  900:\n    RegionID: 900\n    nodes:\n      - HostName: x\n",
        "bad-escape": b'regions:\n  900:\n    regionname: "\\UFFFFFFFF"\n',
        "deep-dashes": b"- " * 1500 + b"x\n",
        "bigint-key": b"regions:\n  " + b"9" * 5000 + b": null\n",
        "bigint-value": b"regions:\n  900:\n    regionid: " + b"9" * 5000 + b"\n",
        "nan-latitude": b"regions:\n  900:\n    latitude: nan\n    regioncode: x\n    nodes: []\n",
        "unsupported": b"regions: &r\n  900: *r\n  ? x\n  y: |\n    z\n",
        "tabs": b"regions:\n\t900: null\n",
    }
    seeds["derpmap_yaml"] = yaml_docs
    seeds["derpmap_json"] = {
        "written-by-derpd": dm.to_json(m).encode(),
        "tailscale-shape": json.dumps(
            {
                "Regions": {
                    "900": {
                        "RegionID": 900,
                        "RegionCode": "home",
                        "RegionName": "Home",
                        "Latitude": 1.5,
                        "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": "derp.example.com", "STUNPort": -1}],
                    },
                    "1": None,
                },
                "HomeParams": {"RegionScore": {"900": 0.9}},
                "omitDefaultRegions": True,
            }
        ).encode(),
        "folded-keys": b'{"regions":{"900":{"regionid":900,"nodes":null}}}',
        "deep": deep,
        "bigint": b'{"Regions":{"900":{"RegionID":' + big + b"}}}",
        "bigint-latitude": b'{"Regions":{"900":{"Latitude":' + b"9" * 400 + b"}}}",
        "bigint-region-key": b'{"Regions":{"' + b"9" * 5000 + b'":null}}',
        "nan": b'{"Regions":{"900":{"Latitude":NaN}}}',
        "inf": b'{"Regions":{"900":{"Latitude":1e400}}}',
    }

    # --- TLS ClientHello (real ones are random: rerunning rewrites them)
    seeds["tlshello"] = tls_seeds()

    seeds["meta_cert"] = {
        "meta-cert": tls.meta_certificate(NodePrivate(bytes(range(32))).public),
        "not-der": b"\x30\x82\xff\xff",
        "key-file-text": key_file_text(NodePrivate(bytes(range(32)))).encode(),
    }

    for target, files in seeds.items():
        d = CORPUS / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
        print(f"{target}: {len(files)} seeds, {sum(map(len, files.values()))} bytes")


if __name__ == "__main__":
    main()
