"""derpd derpmap: the maps it writes against Headscale's YAML schema and Tailscale's DERPMap fields,
the mistakes it refuses, the YAML reader against PyYAML, and a map that a real derpd passes a probe with."""

from __future__ import annotations

import json
import os
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from derpd.cli import derpmap, probe
from derpd.net.tls import CertStore, cert_name_pin, self_signed_ip_certificate
from derpd.proto.keys import NodePrivate
from derpd.tools import blockyaml
from derpd.tools import derpmap as dm

from .conftest import start_server

yaml = pytest.importorskip("yaml", reason="PyYAML checks the maps; install the test extras")

# Run "derpd ..." with derpmap/probe attached to the main group exactly as derpd.cli will attach them,
# so the one-line "derpd: error: ..." reporting of derpd.cli.main is what the tests see.
DERPD = [sys.executable, "-m", "derpd"]

# Headscale's YAML (reference a4, derp-example.yaml): yaml.v3's lower-cased tailcfg field names.
HS_TOP = {"regions": dict, "omitdefaultregions": bool, "homeparams": dict}
HS_REGION = {
    "regionid": int,
    "regioncode": str,
    "regionname": str,
    "latitude": float,
    "longitude": float,
    "avoid": bool,
    "nomeasurenohome": bool,
    "nodes": list,
}
HS_NODE = {
    "name": str,
    "regionid": int,
    "hostname": str,
    "certname": str,
    "ipv4": str,
    "ipv6": str,
    "stunport": int,
    "stunonly": bool,
    "derpport": int,
    "insecurefortests": bool,
    "stuntestip": str,
    "canport80": bool,
}
# Tailscale's tailcfg/derpmap.go: field -> (type, omitempty).
TS_MAP = {"HomeParams": (dict, True), "Regions": (dict, False), "omitDefaultRegions": (bool, True)}
TS_REGION = {
    "RegionID": (int, False),
    "RegionCode": (str, False),
    "RegionName": (str, False),
    "Latitude": (float, True),
    "Longitude": (float, True),
    "Avoid": (bool, True),
    "NoMeasureNoHome": (bool, True),
    "Nodes": (list, False),
}
TS_NODE = {
    "Name": (str, False),
    "RegionID": (int, False),
    "HostName": (str, False),
    "CertName": (str, True),
    "IPv4": (str, True),
    "IPv6": (str, True),
    "STUNPort": (int, True),
    "STUNOnly": (bool, True),
    "DERPPort": (int, True),
    "InsecureForTests": (bool, True),
    "STUNTestIP": (str, True),
    "CanPort80": (bool, True),
}
PIN = "sha256-raw:" + "ab" * 32
BASE = ["--region-id", "900", "--region-code", "x"]


def run_derpmap(*args: str) -> tuple[str, str]:
    result = CliRunner().invoke(derpmap, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    return result.stdout, result.stderr


def refusal(*args: str) -> str:
    result = CliRunner().invoke(derpmap, list(args))
    assert result.exit_code == 2, result.output
    return " ".join(result.stderr.split())


def check_headscale_schema(doc: Any) -> None:
    assert isinstance(doc, dict) and set(doc) <= set(HS_TOP) and "regions" in doc
    for rid, region in doc["regions"].items():
        assert type(rid) is int
        if region is None:
            continue
        assert set(region) <= set(HS_REGION), set(region) - set(HS_REGION)
        assert {"regionid", "regioncode", "regionname", "nodes"} <= set(region)
        for key, value in region.items():
            assert type(value) is HS_REGION[key], (key, value)
        assert region["regionid"] == rid
        for node in region["nodes"]:
            assert set(node) <= set(HS_NODE), set(node) - set(HS_NODE)
            assert {"name", "regionid", "hostname"} <= set(node)
            for key, value in node.items():
                assert key == key.lower() and type(value) is HS_NODE[key], (key, value)
            assert node["regionid"] == rid  # tailscale#9526


def check_tailscale_schema(doc: Any) -> None:
    def fields(obj: dict[str, Any], schema: dict[str, tuple[type, bool]]) -> None:
        assert set(obj) <= set(schema), set(obj) - set(schema)
        for key, (kind, omitempty) in schema.items():
            if key not in obj:
                assert omitempty, f"{key} has no omitempty in tailcfg, so it is always written"
                continue
            assert type(obj[key]) is kind, (key, obj[key])
            if omitempty:
                assert obj[key] not in ("", 0, False), f"{key} is omitempty: a zero value is left out"

    fields(doc, TS_MAP)
    for rid, region in doc["Regions"].items():
        assert rid == str(int(rid))
        if region is None:
            continue
        fields(region, TS_REGION)
        assert region["RegionID"] == int(rid)
        for node in region["Nodes"]:
            fields(node, TS_NODE)
            assert node["RegionID"] == int(rid)


CONFIGS: list[tuple[list[str], dict[str, Any]]] = [
    (
        shlex.split("--region-id 900 --region-code home --hostname derp.example.com"),
        {"name": "900a", "hostname": "derp.example.com", "stunport": 0, "derpport": 0},
    ),
    (
        shlex.split(
            "--region-id 901 --region-code ber --region-name 'Home: Berlin #1' --hostname 203.0.113.9 "
            f"--node-name yes --ipv4 203.0.113.9 --ipv6 2001:db8::9 --derp-port 8443 --stun-port 3479 "
            f"--cert-name {PIN} --can-port80"
        ),
        {
            "name": "yes",
            "hostname": "203.0.113.9",
            "ipv4": "203.0.113.9",
            "ipv6": "2001:db8::9",
            "derpport": 8443,
            "stunport": 3479,
            "certname": PIN,
            "canport80": True,
            "regionname": "Home: Berlin #1",
        },
    ),
    (
        shlex.split(
            "--region-id 902 --region-code v6 --hostname derp6.example.com --ipv4 none "
            "--ipv6 2001:db8::1:0:0:1 --stun-port -1 --node-name 1:20"
        ),
        {"name": "1:20", "ipv4": "none", "ipv6": "2001:db8::1:0:0:1", "stunport": -1},
    ),
    (
        shlex.split(
            "--region-id 903 --region-code null --node-name 0x10 --hostname a.example.com "
            "--node hostname=b.example.com,name=~,stun-only --node hostname=c.example.com,derp-port=444"
        ),
        {"name": "0x10", "regioncode": "null"},
    ),
]


@pytest.mark.parametrize(("args", "expect"), CONFIGS)
def test_headscale_yaml_matches_the_schema(args: list[str], expect: dict[str, Any]) -> None:
    out, _ = run_derpmap(*args)
    assert "# Ports: 0 means the default (stunport 3478, derpport 443)" in out
    doc = yaml.safe_load(out)
    check_headscale_schema(doc)
    region = next(iter(doc["regions"].values()))
    node = region["nodes"][0]
    for key, value in expect.items():
        got = region[key] if key in HS_REGION else node[key]
        assert got == value and type(got) is type(value), (key, got)
    assert region["regionid"] == int(args[1])
    # derpd's own reader agrees with PyYAML, and with the JSON rendering of the same options.
    ours, problems = dm.from_headscale_yaml(out)
    assert problems == []
    js, _ = run_derpmap(*args, "--format", "tailscale-json")
    assert dm.from_json(js) == (ours, [])


@pytest.mark.parametrize(("args", "expect"), CONFIGS)
def test_tailscale_json_matches_derpmap_go(args: list[str], expect: dict[str, Any]) -> None:
    out, _ = run_derpmap(*args, "--format", "tailscale-json")
    doc = json.loads(out)
    check_tailscale_schema(doc)
    region = next(iter(doc["Regions"].values()))
    node = region["Nodes"][0]
    go = {f.yaml: f.go for f in (*dm.NODE_FIELDS, *dm.REGION_FIELDS)}
    for key, value in expect.items():
        container = region if key in HS_REGION else node
        if value in ("", 0, False):
            assert go[key] not in container
        else:
            assert container[go[key]] == value


def test_multi_node_region() -> None:
    out, _ = run_derpmap(*CONFIGS[3][0], "--format", "tailscale-json")
    nodes = json.loads(out)["Regions"]["903"]["Nodes"]
    assert [n["Name"] for n in nodes] == ["0x10", "~", "903c"]
    assert nodes[1]["STUNOnly"] is True and "DERPPort" not in nodes[1]
    assert nodes[2]["DERPPort"] == 444
    assert all(n["RegionID"] == 903 for n in nodes)


def test_region_id_warnings() -> None:
    out, err = run_derpmap("--region-id", "3", "--region-code", "x", "--hostname", "derp.example.com")
    assert "Tailscale's own region ids" in err and "900-999" in err
    assert yaml.safe_load(out)["regions"][3]["nodes"][0]["regionid"] == 3
    _, err = run_derpmap("--region-id", "999", "--region-code", "x", "--hostname", "derp.example.com")
    assert "embedded DERP" in err
    _, err = run_derpmap("--region-id", "950", "--region-code", "x", "--hostname", "derp.example.com")
    assert err == ""


def refusal_over_base(args: list[str]) -> str:
    """The refusal of a base node (region 900, code home, derp.example.com) with ``args`` on top."""
    base = {"--region-id": "900", "--region-code": "home", "--hostname": "derp.example.com"}
    return refusal(*[x for k, v in base.items() if k not in args for x in (k, v)], *args)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--region-id", "0"], "out of range"),
        (["--region-id", "1000"], "900-999"),
        (["--hostname", ""], "missing --hostname"),
        (["--hostname", "https://derp.example.com/derp"], "looks like a URL"),
        (["--hostname", "derp.example.com:443"], "--derp-port"),
        (["--hostname", "bad_host!"], "not a valid DNS name"),
        (["--ipv4", "2001:db8::1"], "belongs in ipv6"),
        (["--ipv4", "300.1.2.3"], "not an IP address"),
        (["--ipv6", "198.51.100.1"], "belongs in ipv4"),
        (["--ipv6", "::ffff:198.51.100.1"], "IPv4-mapped"),
        (["--ipv4", "none", "--ipv6", "none"], "no way to reach"),
        (["--derp-port", "0"], "0 means the default port 443"),
        (["--stun-port", "0"], "0 means the default port 3478"),
        (["--derp-port", "65536"], "out of range"),
        (["--stun-port", "-2"], "out of range"),
        (["--stun-only", "--derp-port", "443"], "STUN-only node serves no DERP"),
        (["--stun-only", "--stun-port", "-1"], "serving nothing"),
        (["--cert-name", "sha256-raw:abc"], "64 lowercase hex"),
        (["--region-code", "New York"], "--region-name"),
        (["--node-name", "900b", "--node", "hostname=b.example.com,name=900b"], "duplicate node name '900b'"),
        (["--node-name", "900b", "--node", "hostname=b.example.com"], "duplicate node name '900b'"),  # default name
        (["--node", "hostname=b.example.com,colour=red"], "unknown key 'colour'"),
        (["--node", "hostname=b.example.com,derp-port=x"], "not a number"),
    ],
)
def test_refuses_operator_mistakes(args: list[str], words: str) -> None:
    assert words in refusal_over_base(args)


def test_node_options_without_hostname() -> None:
    text = refusal("--region-id", "900", "--region-code", "x", "--ipv4", "1.2.3.4", "--node", "hostname=b.example.com")
    assert "--ipv4 describes the first node, which needs --hostname" in text
    out, _ = run_derpmap("--region-id", "900", "--region-code", "x", "--node", "hostname=b.example.com")
    assert yaml.safe_load(out)["regions"][900]["nodes"][0]["hostname"] == "b.example.com"


def test_cli_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    out = subprocess.run(
        [*DERPD, "derpmap", "--region-id", "900", "--region-code", "x", "--hostname", "h", "--derp-port", "0"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "derpd: error: --derp-port 0: in a DERP map 0 means the default port 443; omit --derp-port for that, "
        "or give the port"
    ]


def test_every_option_has_help_and_env_twin() -> None:
    for command in (derpmap, probe):
        for opt in command.params:
            if opt.param_type_name != "option" or opt.name == "help":
                continue
            flag = opt.opts[0]
            assert opt.help and opt.envvar == "DERPD_" + flag[2:].upper().replace("-", "_"), flag  # type: ignore[attr-defined]
    result = CliRunner().invoke(
        derpmap, ["--region-code", "x", "--hostname", "derp.example.com"], env={"DERPD_REGION_ID": "905"}
    )
    assert result.exit_code == 0 and "  905:\n" in result.stdout


def test_cert_file_pin(tmp_path: Path) -> None:
    cert_pem, _ = self_signed_ip_certificate("192.0.2.7")
    crt = tmp_path / "192.0.2.7.crt"
    crt.write_bytes(cert_pem)
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)
    out, err = run_derpmap(*BASE, "--hostname", "192.0.2.7", "--cert-file", str(crt))
    assert yaml.safe_load(out)["regions"][900]["nodes"][0]["certname"] == cert_name_pin(der)
    assert err == ""
    # The certificate must be for the hostname clients dial (they check it too).
    assert "not valid for IP 192.0.2.8" in refusal(*BASE, "--hostname", "192.0.2.8", "--cert-file", str(crt))
    assert "not a PEM or DER certificate" in refusal(*BASE, "--hostname", "192.0.2.7", "--cert-file", __file__)
    assert "not both" in refusal(*BASE, "--hostname", "192.0.2.7", "--cert-file", str(crt), "--cert-name", PIN)
    # An IP hostname without a pin, and a CA-issued certificate pinned, both get a warning.
    _, err = run_derpmap(*BASE, "--hostname", "192.0.2.7")
    assert "pin it with --cert-file" in err
    ca = trustme.CA()
    leaf = ca.issue_cert("derp.example.com")
    ca_crt = tmp_path / "ca-issued.crt"
    ca_crt.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    _, err = run_derpmap(*BASE, "--hostname", "derp.example.com", "--cert-file", str(ca_crt))
    assert "CA-issued" in err


def test_merge_into_an_existing_map(tmp_path: Path) -> None:
    existing = tmp_path / "derp.yaml"
    existing.write_text(
        "# my regions\nregions:\n  1: null  # no Tailscale region 1\n  901:\n    regionid: 901\n    regioncode: old\n"
        "    regionname: Old\n    nodes:\n    - name: 901a\n      regionid: 901\n      hostname: old.example.com\n"
        "  900:\n    regionid: 900\n    regioncode: replaced\n    regionname: Replaced\n    nodes: []\n"
    )
    out, err = run_derpmap(*BASE, "--hostname", "new.example.com", "--merge", str(existing))
    doc = yaml.safe_load(out)
    check_headscale_schema(doc)
    assert doc["regions"][1] is None
    assert doc["regions"][901]["nodes"][0]["hostname"] == "old.example.com"
    assert doc["regions"][900]["regioncode"] == "x"
    assert err == ""  # the replaced region's own problem (no nodes) is gone with it
    text = refusal(*BASE, "--hostname", "n.example.com", "--node-name", "901a", "--merge", str(existing))
    assert "name '901a' is already used in region" in text


# --- reading maps ------------------------------------------------------------------------------------

YAML_DOCS = [
    # Headscale's example shape: plain IPs, ports 0, a null region, comments.
    """# comment
regions:
  1: null # Disable DERP region with ID 1
  900:
    regionid: 900
    regioncode: custom
    regionname: My Region
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
    # Compact sequences, quotes with escapes and '#', a document marker, blank lines, empty collections.
    """---
regions:

  900:
    regionid: 900
    regioncode: 'it''s'
    regionname: "Zürich \\"HQ\\" # not a comment\\t\\u00e9"
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
]


def _plain(tree: Any) -> Any:
    """derpd's YAML tree with every scalar as its text: what PyYAML's BaseLoader gives."""
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_plain(v) for v in tree]
    return tree.text


@pytest.mark.parametrize("text", YAML_DOCS)
def test_yaml_reader_agrees_with_pyyaml(text: str) -> None:
    assert _plain(blockyaml.read(text)) == yaml.load(text, Loader=yaml.BaseLoader)
    m, problems = dm.from_headscale_yaml(text)
    assert [p for p in problems if "no nodes" not in p and "pin must be" not in p] == []
    assert all(node.region_id == rid for rid, r in m.regions.items() if r for node in r.nodes)


def test_generated_yaml_reads_back_identically() -> None:
    region, _ = dm.build_region(
        950, "a", "Name: with # and 'quotes' and \"more\"", [dm.NodeSpec(hostname="derp.example.com", name="on")]
    )
    m = dm.DerpMap(regions={950: region, 2: None}, omit_default_regions=True, region_score={950: 0.5})
    text = dm.to_headscale_yaml(m)
    assert dm.from_headscale_yaml(text) == (m, [])
    assert _plain(blockyaml.read(text)) == yaml.load(text, Loader=yaml.BaseLoader)
    assert dm.from_json(dm.to_json(m)) == (m, [])


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("regions:\n\t900: null\n", "tabs"),
        ("regions: &r\n  900: null\n", "anchors"),
        ("regions:\n  900:\n    regionid: 900\n    nodes: [a, b]\n", "flow collections"),
        ("regions:\n  900:\n    regionname: |\n      x\n", "block scalars"),
        ("regions:\n  900: null\n  900: null\n", "appears twice"),
        ("regions:\n  900:\n    regionid: '900'\n", "expected an integer, got string '900'"),
        ("regions:\n  900:\n    regionid: 900\n    avoid: maybe\n", "expected true or false"),
        ("regions:\n  abc: null\n", "not an integer id"),
        ('regions:\n  900:\n    regionname: "unterminated\n', "same line"),
        ("regions:\n  900:\n  regionid: 900\n    x: 1\n", "unexpected indentation"),
        ("", "empty"),
    ],
)
def test_yaml_reader_refuses_what_it_does_not_understand(text: str, words: str) -> None:
    with pytest.raises(dm.DerpMapError, match=words):
        dm.from_headscale_yaml(text)


def test_camel_case_yaml_keys_are_reported() -> None:
    text = (
        "regions:\n  900:\n    RegionID: 900\n    regioncode: x\n    regionname: x\n    nodes:\n"
        "      - name: 900a\n        RegionID: 900\n        HostName: derp.example.com\n"
    )
    _, problems = dm.from_headscale_yaml(text)
    joined = "\n".join(problems)
    assert "unknown key 'RegionID' is ignored; Headscale's YAML keys are lower-case: regionid" in joined
    assert "line 8" in joined and "no regionid" in joined and "tailscale#9526" in joined and "no hostname" in joined


def test_json_reading_follows_encoding_json() -> None:
    # Field names match case-insensitively, as encoding/json does; unknown ones are reported.
    text = '{"regions": {"900": {"regionid": 900, "RegionCode": "x", "RegionName": "x", "Nodes": [{"name": "a", '
    text += '"RegionID": 900, "hostname": "h.example.com", "Port": 1}]}, "1": null}}'
    m, problems = dm.from_json(text)
    assert m.regions[1] is None and m.regions[900] is not None and m.regions[900].nodes[0].host_name == "h.example.com"
    assert problems == ["regions.900.Nodes[0]: unknown key 'Port' is ignored"]
    with pytest.raises(dm.DerpMapError, match="expected an integer"):
        dm.from_json('{"Regions": {"900": {"RegionID": "900"}}}')
    with pytest.raises(dm.DerpMapError, match="not valid JSON"):
        dm.from_json("{")


def test_check_map_finds_broken_maps() -> None:
    a = dm.DerpRegion(900, "a", "A", nodes=[dm.DerpNode("n", 900, "a.example.com", ipv4="::1")])
    b = dm.DerpRegion(901, "b", "B", nodes=[dm.DerpNode("n", 0, "", stun_only=True, stun_port=-1)])
    c = dm.DerpRegion(903, "c", "C", nodes=[])
    problems = dm.check_map(dm.DerpMap(regions={900: a, 902: b, 903: c}))
    text = "\n".join(problems)
    for words in (
        "ipv4 '::1' is an IPv6 address",
        "its regionid is 901, not the key 902",
        "name 'n' is already used in region 900",
        "no regionid",
        "no hostname",
        "stunonly with stunport -1",
        "region 903: no nodes",
    ):
        assert words in text, words


# --- the round trip: derpd derpmap -> derpd probe --derp-map against a real derpd ---------------------


@pytest.mark.parametrize("fmt", dm.FORMATS)
async def test_map_for_a_real_derpd_passes_the_probe(nursery: trio.Nursery, tmp_path: Path, fmt: str) -> None:
    key = NodePrivate.generate()
    store = CertStore(tmp_path / "certs", "127.0.0.1", key.public)
    store.load()  # creates derpd's self-signed IP certificate, as `derpd serve --certmode manual` does
    server = await start_server(nursery, key, tls=store, hostname="127.0.0.1", stun_port=0, http_port=0)
    stun_port = server.stun_addrs[0][1]
    args = f"--hostname 127.0.0.1 --ipv4 127.0.0.1 --ipv6 none --derp-port {server.port} --stun-port {stun_port}"
    out, err = run_derpmap(*BASE, *args.split(), "--cert-file", str(store.cert_path), "--can-port80", "--format", fmt)
    assert "loopback" in err  # honest about 127.0.0.1 being useless to other machines
    path = tmp_path / ("derp.yaml" if fmt == dm.HEADSCALE_YAML else "derp.json")
    path.write_text(out)
    probe = await trio.run_process(
        [
            *DERPD,
            "probe",
            "--derp-map",
            str(path),
            "--json",
            "--count",
            "3",
            "--http-port",
            str(server.http_addrs[0][1]),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    report = json.loads(probe.stdout)
    assert probe.returncode == 0, probe.stderr.decode()
    assert report["ok"] and report["problems"] == []
    (node,) = report["nodes"]
    assert node["node"] == "900a" and node["region_id"] == 900
    checks = {c["name"]: c for c in node["checks"]}
    assert checks["tls v4"]["pin_match"] is True and checks["tls v4"]["cert_pin"] == store.pin
    assert checks["port80"]["challenge_ok"] is True
    assert checks["stun v4"]["mapped"].startswith("127.0.0.1:")
    assert checks["tcp v6"]["status"] == "skip" and "ipv6: none" in checks["tcp v6"]["detail"]
    assert node["server_keys"] == [f"nodekey:{key.public.hex()}"]


# --- what Headscale (yaml.v3) reads exactly: strings, floats, --cert-name ----------------------------

# Raw in a file these are refused by yaml.v3 (C0 but tab/LF/CR, DEL, C1 but NEL, U+FFFE/U+FFFF), read
# as a line break (NEL; U+2028 and U+2029 to YAML 1.1 readers), or a byte order mark (U+FEFF).
PROBLEM_CHARS = [chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))] + [
    "\u2028",
    "\u2029",
    "\ufeff",
    "\ufffe",
    "\uffff",
]
STRING_FIELDS = [f for f in (*dm.REGION_FIELDS, *dm.NODE_FIELDS) if f.kind is str]


def raw_problem(text: str) -> str | None:
    """The first character of ``text`` that must not appear raw in a YAML file for Headscale, if any."""
    for c in text:
        if c == "\n":
            continue
        if c in PROBLEM_CHARS or 0xD800 <= ord(c) <= 0xDFFF:
            return f"U+{ord(c):04X}"
    return None


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("x\x85y", '"x\\u0085y"'),  # NEL: a space to yaml.v3 when raw
        ("\x7f", '"\\u007F"'),
        ("\x80\x9f", '"\\u0080\\u009F"'),
        ("\u2028\u2029", '"\\u2028\\u2029"'),
        ("\ufeffa", '"\\uFEFFa"'),
        ("\ufffe\uffff", '"\\uFFFE\\uFFFF"'),
        ("a\tb\nc\x00", '"a\\u0009b\\u000Ac\\u0000"'),
        ("\U000e0001", '"\\U000E0001"'),  # an astral format character: escaped with \U, not a surrogate pair
        ("Zürich 😀 \U0001d7d9", '"Zürich 😀 \U0001d7d9"'),  # printable, astral too: raw UTF-8
        ('say "hi" \\o/', '"say \\"hi\\" \\\\o/"'),
        ("derp.example.com", "derp.example.com"),
        ("yes", '"yes"'),
        ("", '""'),
    ],
)
def test_yaml_str_escapes_what_yaml_readers_take_wrongly(value: str, written: str) -> None:
    assert blockyaml.write_str(value) == written
    assert yaml.safe_load(f"v: {written}")["v"] == value
    assert raw_problem(written) is None
    assert "\\uD8" not in written.upper() and "\\uDC" not in written.upper()  # no surrogate escapes: yaml.v3 refuses


def _map_with_strings(values: dict[str, str]) -> dm.DerpMap:
    region = dm.DerpRegion(region_id=900, nodes=[dm.DerpNode(region_id=900)])
    for f in dm.REGION_FIELDS:
        if f.kind is str:
            setattr(region, f.attr, values[f"region.{f.yaml}"])
    for f in dm.NODE_FIELDS:
        if f.kind is str:
            setattr(region.nodes[0], f.attr, values[f"node.{f.yaml}"])
    return dm.DerpMap(regions={900: region})


_ANY_TEXT = st.text(
    alphabet=st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from([*PROBLEM_CHARS, "\\", '"'])),
    max_size=20,
)
_FIELD_KEYS = [f"region.{f.yaml}" for f in dm.REGION_FIELDS if f.kind is str] + [
    f"node.{f.yaml}" for f in dm.NODE_FIELDS if f.kind is str
]


@given(st.fixed_dictionaries({k: _ANY_TEXT for k in _FIELD_KEYS}))
@settings(max_examples=300, deadline=None)
def test_every_string_field_round_trips_through_headscale_yaml(values: dict[str, str]) -> None:
    m = _map_with_strings(values)
    text = dm.to_headscale_yaml(m)
    assert raw_problem(text) is None, raw_problem(text)
    ours, _ = dm.from_headscale_yaml(text)  # problems (an IP that is not one...) do not matter here
    assert ours.regions == m.regions
    doc = yaml.safe_load(text)
    region, node = doc["regions"][900], doc["regions"][900]["nodes"][0]
    for key, value in values.items():
        scope, name = key.split(".")
        got = (region if scope == "region" else node).get(name, "")
        assert got == value and type(got) is str, (key, got, value)


@pytest.mark.parametrize("field", STRING_FIELDS, ids=lambda f: f.yaml)
def test_a_lone_surrogate_is_refused_with_its_field(field: Any) -> None:
    """No encoding carries one to Headscale: yaml.v3 refuses the \\uD800 escape, Go's JSON makes it U+FFFD."""
    values = dict.fromkeys(_FIELD_KEYS, "ok")
    values[f"{'region' if field in dm.REGION_FIELDS else 'node'}.{field.yaml}"] = "a\udcff"
    m = _map_with_strings(values)
    for write in (dm.to_headscale_yaml, dm.to_json):
        with pytest.raises(dm.DerpMapError, match=f"{field.yaml}: 'a\\\\udcff' contains U\\+DCFF"):
            write(m)


def test_yaml_reader_refuses_what_yaml_v3_refuses() -> None:
    ok = "regions:\n  900:\n    regionid: 900\n    regioncode: x\n    regionname: {}\n    nodes: []\n"
    for raw in ("\x85", "\x80", "\x7f", "\x01", "\u2028", "\ufffe"):
        with pytest.raises(dm.DerpMapError, match=f"line 5: raw character U\\+{ord(raw):04X}"):
            dm.from_headscale_yaml(ok.format(f'"a{raw}b"'))
    for escape in ("\\uD800", "\\uDFFF", "\\U00110000"):
        with pytest.raises(dm.DerpMapError, match="not a Unicode character"):
            dm.from_headscale_yaml(ok.format(f'"{escape}"'))
    m, _ = dm.from_headscale_yaml(ok.format('"\\u0085\\U0001F600\\uFEFF"') + "")
    assert m.regions[900] is not None and m.regions[900].region_name == "\x85\U0001f600\ufeff"
    # A raw tab inside quotes and Unicode spaces are text, as in YAML.
    m, _ = dm.from_headscale_yaml(ok.format('"a\tb"  ').replace("regioncode: x", "regioncode: \u00a0x\u3000"))
    assert m.regions[900] is not None and m.regions[900].region_name == "a\tb"
    assert m.regions[900].region_code == "\u00a0x\u3000"
    assert yaml.safe_load(ok.format('"a\tb"').replace("regioncode: x", "regioncode: \u00a0x\u3000"))["regions"][900][
        "regioncode"
    ] == ("\u00a0x\u3000")


# --- floats -------------------------------------------------------------------------------------------

# yaml.v3's float syntax (resolve.go yamlStyleFloat), transcribed: a written float must match it.
YAML_V3_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (1e-13, "1.0e-13"),  # was "0." (the defect)
        (0.1, "0.1"),
        (52.52, "52.52"),
        (-13.405, "-13.405"),
        (1.5e-07, "1.5e-7"),
        (1e16, "1.0e+16"),
        (123.0, "123.0"),
        (-0.0, "-0.0"),
        (5e-324, "5.0e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
    ],
)
def test_floats_are_written_shortest_and_exact(value: float, written: str) -> None:
    assert blockyaml.write_float(value) == written


def _same_float(a: Any, b: float) -> bool:
    return type(a) is float and struct.pack("<d", a) == struct.pack("<d", b)


@given(st.floats(allow_nan=False, allow_infinity=False), st.floats(allow_nan=False, allow_infinity=False))
@settings(max_examples=500, deadline=None)
def test_every_written_float_reads_back_exactly(latitude: float, score: float) -> None:
    text = blockyaml.write_float(latitude)
    assert YAML_V3_FLOAT.fullmatch(text), text  # yaml.v3 resolves it as a float
    assert _same_float(yaml.safe_load(f"v: {text}")["v"], latitude), text  # and so does YAML 1.1 (PyYAML)
    region = dm.DerpRegion(900, "x", "x", latitude=latitude, longitude=-latitude, nodes=[])
    m = dm.DerpMap(regions={900: region}, region_score={900: score})
    out = dm.to_headscale_yaml(m)
    ours, _ = dm.from_headscale_yaml(out)
    back = ours.regions[900]
    assert back is not None and back.latitude == latitude and back.longitude == -latitude
    assert ours.region_score is not None and _same_float(ours.region_score[900], score)
    doc = yaml.safe_load(out)
    assert _same_float(doc["homeparams"]["regionscore"][900], score)
    if latitude:  # 0.0 is omitted, as omitempty
        assert _same_float(doc["regions"][900]["latitude"], latitude)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("latitude: .nan", "not a finite number"),
        ("latitude: -.inf", "not a finite number"),
        ("latitude: 1e999", "not a finite number"),
        ("latitude: nan", "expected a number"),  # a string to yaml.v3
        ("latitude: 1.2.3", "expected a number"),
    ],
)
def test_yaml_reader_floats_follow_yaml_v3(text: str, words: str) -> None:
    doc = f"regions:\n  900:\n    regionid: 900\n    regioncode: x\n    regionname: x\n    {text}\n    nodes: []\n"
    with pytest.raises(dm.DerpMapError, match=words):
        dm.from_headscale_yaml(doc)


def test_yaml_reader_reads_yaml_v3_floats() -> None:
    doc = "regions:\n  900:\n    regionid: 900\n    regioncode: x\n    regionname: x\n    latitude: {}\n    nodes: []\n"
    for text, value in (("1e-13", 1e-13), ("1.0e-13", 1e-13), (".5", 0.5), ("1_000.5", 1000.5), ("7", 7.0)):
        m, _ = dm.from_headscale_yaml(doc.format(text))
        assert m.regions[900] is not None and m.regions[900].latitude == value, text


def test_json_reader_refuses_non_finite_numbers() -> None:
    for number in ("NaN", "Infinity", "-Infinity", "1e999"):
        with pytest.raises(dm.DerpMapError, match=r"not valid JSON|not a finite number"):
            dm.from_json('{"Regions": {"900": {"RegionID": 900, "Latitude": ' + number + ', "Nodes": []}}}')


def test_merge_keeps_tiny_floats_exact(tmp_path: Path) -> None:
    existing = tmp_path / "derp.json"
    existing.write_text(
        '{"HomeParams": {"RegionScore": {"901": 1e-13}}, "Regions": {"901": {"RegionID": 901, "RegionCode": "o", '
        '"RegionName": "O", "Latitude": 1e-13, "Longitude": -2.5e-300, "Nodes": [{"Name": "901a", "RegionID": 901, '
        '"HostName": "old.example.com"}]}}}'
    )
    out, _ = run_derpmap(*BASE, "--hostname", "new.example.com", "--merge", str(existing))
    assert "latitude: 1.0e-13" in out and "longitude: -2.5e-300" in out and "901: 1.0e-13" in out
    doc = yaml.safe_load(out)
    assert doc["regions"][901]["latitude"] == 1e-13 and doc["homeparams"]["regionscore"][901] == 1e-13
    ours, _ = dm.from_headscale_yaml(out)
    assert ours.regions[901] is not None and ours.regions[901].longitude == -2.5e-300


# --- --cert-name and the other text options ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--cert-name", "derp.example.com\x7f"], "'derp.example.com\\x7f' contains the control character U+007F"),
        (["--cert-name", "\x7f"], "contains the control character U+007F"),
        (["--cert-name", "derp\x01.example.com"], "control character U+0001"),
        (["--cert-name", "derp.example.com\x85"], "control character U+0085"),  # str.strip() would drop it
        (["--cert-name", "derp\u2028x"], "line separator U+2028"),
        (["--cert-name", "\ufeffderp.example.com"], "byte order mark"),
        (["--cert-name", "derp example"], "ASCII, without spaces"),
        (["--cert-name", "bücher.example"], "xn--"),
        (["--node", "hostname=b.example.com,cert-name=b\x7f"], "--cert-name 'b\\x7f' contains the control character"),
        (["--region-name", "Home\x85"], "--region-name 'Home\\x85' contains the control character U+0085"),
        (["--region-name", "Home\ufffe"], "noncharacter U+FFFE"),
        (["--region-code", "fra\x9b"], "--region-code 'fra\\x9b' contains the control character U+009B"),
        (["--node-name", "900a\u2029"], "line separator U+2029"),
        (["--region-name", "a\udcff"], "surrogate pair: not a character (is the input UTF-8?)"),
    ],
)
def test_text_options_refuse_what_headscale_cannot_read(args: list[str], words: str) -> None:
    assert words in refusal_over_base(args)


def test_text_options_keep_printable_unicode() -> None:
    name = "Zürich 😀 \u200d"  # a ZWJ (format character) is part of emoji sequences: kept, written escaped
    out, _ = run_derpmap(
        *BASE, "--hostname", "derp.example.com", "--region-name", name, "--cert-name", "xn--bcher-kva.example"
    )
    assert 'regionname: "Zürich 😀 \\u200D"' in out
    assert yaml.safe_load(out)["regions"][900]["regionname"] == name
    assert dm.from_headscale_yaml(out)[0].regions[900].region_name == name  # type: ignore[union-attr]


@pytest.mark.parametrize(("bad", "code"), [("derp.example.com\x7f", "U+007F"), ("derp\x1b[31m.example.com", "U+001B")])
def test_cert_name_control_characters_exit_2_one_line(tmp_path: Path, bad: str, code: str) -> None:
    out = subprocess.run(
        [*DERPD, "derpmap", *BASE, "--hostname", "derp.example.com", "--cert-name", bad],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line == f"derpd: error: --cert-name {bad!r} contains the control character {code}"


def test_non_utf8_argument_is_refused_not_a_traceback(tmp_path: Path) -> None:
    out = subprocess.run(
        [*DERPD, "derpmap", *BASE, "--hostname", "derp.example.com", "--region-name", b"Caf\xe9"],  # Latin-1
        capture_output=True,
        check=False,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"},
    )
    assert out.returncode == 2 and out.stdout == b""
    (line,) = out.stderr.decode().splitlines()
    assert line.startswith("derpd: error: --region-name ") and "is the input UTF-8?" in line


@pytest.mark.parametrize(
    ("text", "value"),
    [("901", 901), ("01605", 901), ("0901", 901), ("0o1605", 901), ("0x385", 901), ("0b1110000101", 901),
     ("9_01", 901), ("901.0", 901), ("+901", 901)],
)  # fmt: skip
def test_yaml_reader_reads_integers_as_yaml_v3(text: str, value: int) -> None:
    """yaml.v3 resolves integers with Go's ParseInt(plain, 0, 64): a leading 0 is octal (01605 is
    901), prefixes and underscores are taken; what is not an integer but a float (0901: 9 is no octal
    digit, so it reads as 901.0) fits an int field when it is integral."""
    doc = f"regions:\n  901:\n    regionid: {text}\n    regioncode: x\n    regionname: x\n    nodes: []\n"
    m, _ = dm.from_headscale_yaml(doc)
    assert m.regions[901] is not None and m.regions[901].region_id == value


@pytest.mark.parametrize(
    "text",
    [
        "- " * 500,  # nesting: the reader used to recurse once per level (RecursionError)
        "regions:\n  " + "9" * 5000 + ": null\n",  # a 5000-digit region key (Python's int-string limit)
        "regions:\n  900:\n    regionid: " + "9" * 5000 + "\n",
        '{"Regions": {"' + "9" * 5000 + '": null}}',  # what derpd probe --derp-map URL may fetch
        '{"Regions": ' + "[" * 3000 + "]" * 3000 + "}",
    ],
)
def test_hostile_maps_are_refused_with_a_short_message(text: str) -> None:
    """Found by tests/fuzz: each used to escape as RecursionError or ValueError. Now a DerpMapError
    whose message does not echo the 5000 digits back."""
    with pytest.raises(dm.DerpMapError) as e:
        dm.parse(text)
    assert len(str(e.value)) < 200
