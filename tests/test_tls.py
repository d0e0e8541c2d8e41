"""derpd.net.tls over real TLS on loopback: meta cert, certmode manual, self-signed IP certs, pins, reload."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from derpd.net.tls import (
    CertError,
    CertPinError,
    CertStore,
    cert_file_stem,
    cert_name_pin,
    check_pin,
    fast_start_key,
    meta_certificate,
    parse_meta_certificate,
    peer_chain_der,
    pinned_context,
    self_signed_ip_certificate,
    verify_hostname,
)
from derpd.net.transport import SocketTransport, TLSTransport

from .conftest import derpd_logger

HOST = "derp.example.test"
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def server_key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def derpd_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture the "derpd" logger even if something set propagate=False on it (log.setup does)."""
    with derpd_logger(caplog, logging.INFO) as captured:
        yield captured


# --- helpers -------------------------------------------------------------------------------------------


def write_leaf(certdir: Path, leaf: trustme.LeafCert, name: str = HOST) -> None:
    certdir.mkdir(parents=True, exist_ok=True)
    (certdir / f"{name}.crt").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    (certdir / f"{name}.key").write_bytes(leaf.private_key_pem.bytes())


def trusting(ca: trustme.CA, *, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.set_alpn_protocols(["http/1.1"])
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def insecure(*, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


async def serve_echo(nursery: trio.Nursery, get_context: Callable[[], ssl.SSLContext]) -> int:
    """A TLS echo server; each connection is wrapped with whatever ``get_context()`` returns then."""

    async def handle(stream: trio.SocketStream) -> None:
        # The server's own TLS path (net.transport.TLSTransport): it also sends OpenSSL's alert on refusal.
        tls = TLSTransport(SocketTransport.from_trio(stream.socket), get_context(), b"")
        try:
            await tls.handshake()
            while data := await tls.receive_some(65536):
                await tls.send_all(data)
        except (ssl.SSLError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await tls.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return listeners[0].socket.getsockname()[1]


async def dial(port: int, ctx: ssl.SSLContext, server_hostname: str | None) -> trio.SSLStream[trio.SocketStream]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, ctx, server_hostname=server_hostname)
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


async def dial_refused(port: int, ctx: ssl.SSLContext, server_hostname: str | None) -> BaseException:
    """Dial, expecting the handshake to fail; returns the underlying cause."""
    with pytest.raises(trio.BrokenResourceError) as info:
        await dial(port, ctx, server_hostname)
    assert info.value.__cause__ is not None
    return info.value.__cause__


async def echo(tls: trio.SSLStream[trio.SocketStream], payload: bytes) -> None:
    await tls.send_all(payload)
    got = b""
    while len(got) < len(payload):
        chunk = await tls.receive_some(65536)
        assert chunk, "connection closed"
        got += chunk
    assert got == payload


def leaf_of(tls: trio.SSLStream[trio.SocketStream]) -> x509.Certificate:
    return x509.load_der_x509_certificate(peer_chain_der(tls)[0])


def meta_like(cn: str, serial: int) -> bytes:
    key = ed25519.Ed25519PrivateKey.generate()
    with warnings.catch_warnings():  # CNs over 64 characters, as the meta cert has
        warnings.simplefilter("ignore")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.DER)


# --- meta certificate --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Attribute's length")  # the 71-character CN, read back here
def test_meta_certificate_fields(server_key: bytes) -> None:
    cert = x509.load_der_x509_certificate(meta_certificate(server_key, now=NOW))
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "derpkey" + server_key.hex()
    assert re.fullmatch(r"derpkey[0-9a-f]{64}", cn)
    assert cert.issuer == cert.subject
    assert cert.serial_number == 2
    assert cert.not_valid_before_utc == NOW - timedelta(days=30)
    assert cert.not_valid_after_utc == NOW + timedelta(days=30)
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.value.ca is False and bc.critical
    cert.verify_directly_issued_by(cert)  # really self-signed


def test_meta_certificate_round_trip(server_key: bytes) -> None:
    assert parse_meta_certificate(meta_certificate(server_key)) == server_key


@pytest.mark.parametrize(
    ("cn", "serial", "accepted"),
    [
        ("derpkey" + "ab" * 32, 2, True),
        ("derpkey" + "AB" * 32, 2, True),  # Go's hex parsing takes either case
        ("derpkey" + "ab" * 32, 255, True),  # versions up to 255
        ("derpkey" + "ab" * 32, 256, False),  # serial of a real certificate, not a protocol version
        ("derpkey" + "ab" * 32, 1 << 100, False),
        ("derpkey" + "ab" * 31 + "a", 2, False),  # 63 hex digits
        ("derpkey" + "ab" * 33, 2, False),  # 66
        ("derpkey" + "zz" * 32, 2, False),
        ("derpkex" + "ab" * 32, 2, False),
        ("derp.example.test", 2, False),
    ],
)
def test_parse_meta_certificate_rules(cn: str, serial: int, accepted: bool) -> None:
    got = parse_meta_certificate(meta_like(cn, serial))
    assert got == (bytes.fromhex(cn[7:]) if accepted else None)


def test_parse_meta_certificate_rejects_normal_certs_and_garbage() -> None:
    leaf = trustme.CA().issue_cert(HOST)
    der = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(serialization.Encoding.DER)
    assert parse_meta_certificate(der) is None
    assert parse_meta_certificate(b"\x30\x03garbage") is None
    assert parse_meta_certificate(b"") is None


# --- self-signed IP certificates, pins, hostname rules -----------------------------------------------


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1"])
def test_self_signed_ip_certificate(ip: str) -> None:
    cert_pem, key_pem = self_signed_ip_certificate(ip, now=NOW)
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert b"BEGIN EC PRIVATE KEY" in key_pem
    assert cert.public_key() == key.public_key()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(ip)]
    assert cert.not_valid_before_utc == NOW
    assert cert.not_valid_after_utc == datetime(2027, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    cert.verify_directly_issued_by(cert)
    verify_hostname(cert, ip)


def test_self_signed_ip_certificate_on_feb_29_lasts_until_mar_1() -> None:
    cert_pem, _ = self_signed_ip_certificate("127.0.0.1", now=datetime(2028, 2, 29, tzinfo=UTC))
    assert x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc == datetime(2029, 3, 1, tzinfo=UTC)


def test_self_signed_ip_certificate_needs_an_ip() -> None:
    with pytest.raises(CertError, match="not an IP address"):
        self_signed_ip_certificate(HOST)


def test_cert_name_pin_format() -> None:
    der = b"any DER bytes"
    pin = cert_name_pin(der)
    assert re.fullmatch(r"sha256-raw:[0-9a-f]{64}", pin)
    assert pin == "sha256-raw:" + hashlib.sha256(der).hexdigest()


def test_cert_file_stem_matches_derper() -> None:
    assert cert_file_stem("derp.example.test") == "derp.example.test"
    assert cert_file_stem("../../etc/passwd") == "....etcpasswd"
    assert cert_file_stem("::1") == "1"  # derper strips the colons too


@pytest.mark.parametrize(
    ("sans", "host", "ok"),
    [
        (["derp.example.test"], "derp.example.test", True),
        (["DERP.Example.Test"], "derp.example.TEST.", True),
        (["*.example.test"], "derp.example.test", True),
        (["*.example.test"], "a.derp.example.test", False),  # one label only
        (["*.example.test"], "example.test", False),
        (["other.test"], "derp.example.test", False),
        ([], "derp.example.test", False),
    ],
)
def test_verify_hostname_dns(sans: list[str], host: str, ok: bool) -> None:
    ca = trustme.CA()
    pem = ca.issue_cert(*sans).cert_chain_pems[0].bytes() if sans else ca.cert_pem.bytes()
    cert = x509.load_pem_x509_certificate(pem)
    if ok:
        verify_hostname(cert, host)
    else:
        with pytest.raises(CertError, match="not valid for"):
            verify_hostname(cert, host)


def test_verify_hostname_ip_uses_ip_sans_only() -> None:
    cert = x509.load_pem_x509_certificate(trustme.CA().issue_cert("127.0.0.2", HOST).cert_chain_pems[0].bytes())
    verify_hostname(cert, "127.0.0.2")
    with pytest.raises(CertError, match=r"not valid for IP 127\.0\.0\.1"):
        verify_hostname(cert, "127.0.0.1")


# --- certmode manual with an IP hostname: generated certificate ----------------------------------


async def test_ip_store_generates_then_reuses_and_pins(
    nursery: trio.Nursery, tmp_path: Path, server_key: bytes, derpd_log: pytest.LogCaptureFixture
) -> None:
    certdir = tmp_path / "certs"  # does not exist yet
    store = CertStore(certdir, "127.0.0.1", server_key)
    store.load()
    assert store.generated
    assert stat.S_IMODE(certdir.stat().st_mode) == 0o700
    assert stat.S_IMODE((certdir / "127.0.0.1.key").stat().st_mode) == 0o600
    assert sorted(p.name for p in certdir.iterdir()) == ["127.0.0.1.crt", "127.0.0.1.key"]  # no temp files left
    der = x509.load_pem_x509_certificate((certdir / "127.0.0.1.crt").read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert store.pin == cert_name_pin(der)
    assert store.derp_node() == {"Name": "custom", "RegionID": 900, "HostName": "127.0.0.1", "CertName": store.pin}
    assert any(r.getMessage() == "tls_ip_cert" and store.pin in str(r.fields) for r in derpd_log.records)  # type: ignore[attr-defined]

    again = CertStore(certdir, "127.0.0.1", server_key)
    again.load()
    assert not again.generated
    assert again.pin == store.pin

    port = await serve_echo(nursery, lambda: again.context)
    assert store.pin is not None
    for sni in ("127.0.0.1", None):  # Python sends no SNI for an IP; also without server_hostname
        tls = await dial(port, pinned_context(store.pin), sni)
        chain = peer_chain_der(tls)
        assert chain[0] == der and len(chain) == 2
        assert parse_meta_certificate(chain[-1]) == server_key
        assert fast_start_key(tls) == server_key
        await echo(tls, b"pinned")
        await tls.aclose()


async def test_ip_store_with_its_key_missing_refuses(tmp_path: Path, server_key: bytes) -> None:
    """A certificate without its key cannot be used, and nothing derpd writes leaves that state."""
    CertStore(tmp_path, "127.0.0.1", server_key).load()
    (tmp_path / "127.0.0.1.key").unlink()
    with pytest.raises(CertError, match=r"127\.0\.0\.1\.key is missing.*remove the other file"):
        CertStore(tmp_path, "127.0.0.1", server_key).load()


async def test_ip_store_key_without_certificate_gets_one(
    tmp_path: Path, server_key: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """What a crash between the two atomic writes leaves (key first, then certificate): the next
    start makes a certificate for that key instead of refusing to start."""
    first = CertStore(tmp_path, "127.0.0.1", server_key)
    first.load()
    key_pem = (tmp_path / "127.0.0.1.key").read_bytes()
    (tmp_path / "127.0.0.1.crt").unlink()
    again = CertStore(tmp_path, "127.0.0.1", server_key)
    again.load()
    assert again.generated and again.pin != first.pin
    assert (tmp_path / "127.0.0.1.key").read_bytes() == key_pem  # the key was kept
    leaf = x509.load_pem_x509_certificate((tmp_path / "127.0.0.1.crt").read_bytes())
    assert leaf.public_key().public_numbers() == serialization.load_pem_private_key(
        key_pem, None
    ).public_key().public_numbers()  # type: ignore[union-attr]
    assert any(r.getMessage() == "tls_cert_generated_for_existing_key" for r in caplog.records)


@pytest.mark.parametrize("empty", [("crt",), ("key",), ("crt", "key")])
async def test_ip_store_replaces_empty_files(
    tmp_path: Path, server_key: bytes, caplog: pytest.LogCaptureFixture, empty: tuple[str, ...]
) -> None:
    """0-byte files (an older version's interrupted write) count as missing, with a warning."""
    CertStore(tmp_path, "127.0.0.1", server_key).load()
    if "key" in empty:
        (tmp_path / "127.0.0.1.crt").unlink()  # the key's certificate is useless without it
    for ext in empty:
        (tmp_path / f"127.0.0.1.{ext}").write_bytes(b"")
    store = CertStore(tmp_path, "127.0.0.1", server_key)
    store.load()
    assert store.generated and store.pin
    for ext in ("crt", "key"):
        assert (tmp_path / f"127.0.0.1.{ext}").stat().st_size > 0
    assert stat.S_IMODE((tmp_path / "127.0.0.1.key").stat().st_mode) == 0o600
    replaced = [r for r in caplog.records if r.getMessage() == "tls_file_empty_replaced"]
    assert len(replaced) == len(empty) and all(r.levelno == logging.WARNING for r in replaced)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # no temp file left


async def test_ip_store_uses_an_operator_certificate(nursery: trio.Nursery, tmp_path: Path, server_key: bytes) -> None:
    ca = trustme.CA()
    write_leaf(tmp_path, ca.issue_cert("127.0.0.1"), "127.0.0.1")
    store = CertStore(tmp_path, "127.0.0.1", server_key)
    store.load()
    assert not store.generated
    port = await serve_echo(nursery, lambda: store.context)
    tls = await dial(port, trusting(ca), "127.0.0.1")
    await echo(tls, b"ip")
    await tls.aclose()


# --- certmode manual with a DNS hostname --------------------------------------------------------------


@pytest.fixture
def dns_store(tmp_path: Path, server_key: bytes) -> tuple[CertStore, trustme.CA, trustme.CA]:
    """A store for HOST whose leaf is issued by an intermediate CA (root, intermediate)."""
    root = trustme.CA()
    intermediate = root.create_child_ca()
    write_leaf(tmp_path, intermediate.issue_cert(HOST))
    store = CertStore(tmp_path, HOST, server_key)
    store.load()
    return store, root, intermediate


async def test_tls13_client_gets_leaf_chain_and_meta_cert_last(
    nursery: trio.Nursery, dns_store: tuple[CertStore, trustme.CA, trustme.CA], server_key: bytes
) -> None:
    store, root, intermediate = dns_store
    port = await serve_echo(nursery, lambda: store.context)
    tls = await dial(port, trusting(root), HOST)
    assert tls.version() == "TLSv1.3"
    assert tls.selected_alpn_protocol() == "http/1.1"
    chain = peer_chain_der(tls)
    assert len(chain) == 3
    assert store.pin is None  # nothing to publish as CertName for a DNS hostname
    assert cert_name_pin(chain[0]) == store.leaf_pin
    assert (
        x509.load_der_x509_certificate(chain[1]).subject
        == x509.load_pem_x509_certificate(intermediate.cert_pem.bytes()).subject
    )
    assert parse_meta_certificate(chain[-1]) == server_key
    assert [parse_meta_certificate(c) for c in chain[:-1]] == [None, None]
    assert fast_start_key(tls) == server_key
    await echo(tls, b"hello over 1.3")
    await tls.aclose()


async def test_tls12_client_handshakes_without_fast_start(
    nursery: trio.Nursery, dns_store: tuple[CertStore, trustme.CA, trustme.CA], server_key: bytes
) -> None:
    store, root, _ = dns_store
    port = await serve_echo(nursery, lambda: store.context)
    tls = await dial(port, trusting(root, max_version=ssl.TLSVersion.TLSv1_2), HOST)
    assert tls.version() == "TLSv1.2"
    assert tls.selected_alpn_protocol() == "http/1.1"
    assert parse_meta_certificate(peer_chain_der(tls)[-1]) == server_key  # sent, as derper does
    assert fast_start_key(tls) is None  # but only a TLS 1.3 client may use it
    await echo(tls, b"hello over 1.2")
    await tls.aclose()


async def test_sni_must_name_the_dns_hostname(
    nursery: trio.Nursery, dns_store: tuple[CertStore, trustme.CA, trustme.CA]
) -> None:
    store, root, _ = dns_store
    port = await serve_echo(nursery, lambda: store.context)
    tls = await dial(port, trusting(root), HOST.upper())  # SNI compared case-insensitively
    await tls.aclose()
    for sni in ("other.test", None):
        cause = await dial_refused(port, insecure(), sni)
        assert isinstance(cause, ssl.SSLError) and "UNRECOGNIZED_NAME" in str(cause)  # the server's alert


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_tls11_is_refused(nursery: trio.Nursery, dns_store: tuple[CertStore, trustme.CA, trustme.CA]) -> None:
    store, _, _ = dns_store
    port = await serve_echo(nursery, lambda: store.context)
    old = insecure(max_version=ssl.TLSVersion.TLSv1_1)
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client really offer TLS 1.1
    cause = await dial_refused(port, old, HOST)
    assert isinstance(cause, ssl.SSLError) and "ALERT_PROTOCOL_VERSION" in str(cause)  # the server's alert


# --- load errors ----------------------------------------------------------------------------------------


def test_certificate_for_another_name_is_refused(tmp_path: Path, server_key: bytes) -> None:
    write_leaf(tmp_path, trustme.CA().issue_cert("other.test"))
    with pytest.raises(CertError, match=r"not valid for 'derp\.example\.test'.*other\.test"):
        CertStore(tmp_path, HOST, server_key).load()


def test_wildcard_certificate_covers_the_hostname(tmp_path: Path, server_key: bytes) -> None:
    write_leaf(tmp_path, trustme.CA().issue_cert("*.example.test"))
    CertStore(tmp_path, HOST, server_key).load()


def test_missing_files_name_the_expected_paths(tmp_path: Path, server_key: bytes) -> None:
    with pytest.raises(CertError) as info:
        CertStore(tmp_path, HOST, server_key).load()
    msg = str(info.value)
    assert str(tmp_path / f"{HOST}.crt") in msg and str(tmp_path / f"{HOST}.key") in msg
    assert "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # nothing generated for a DNS name


@pytest.mark.parametrize(
    ("crt", "key", "match"),
    [
        (b"not a certificate", None, "no readable PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", None, "no readable PEM certificate"),
        (None, b"not a key", "no readable PEM private key"),
        (None, "other", "does not belong"),
        (None, "encrypted", "encrypted"),
    ],
)
def test_unusable_files_are_refused(
    tmp_path: Path, server_key: bytes, crt: bytes | None, key: bytes | str | None, match: str
) -> None:
    leaf = trustme.CA().issue_cert(HOST)
    write_leaf(tmp_path, leaf)
    if crt is not None:
        (tmp_path / f"{HOST}.crt").write_bytes(crt)
    if key == "other":
        key = trustme.CA().issue_cert(HOST).private_key_pem.bytes()
    elif key == "encrypted":
        pk = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
        enc = serialization.BestAvailableEncryption(b"secret")
        key = pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    if isinstance(key, bytes):
        (tmp_path / f"{HOST}.key").write_bytes(key)
    with pytest.raises(CertError, match=match) as info:
        CertStore(tmp_path, HOST, server_key).load()
    assert "\n" not in str(info.value)


# --- reload -------------------------------------------------------------------------------------------


async def test_reload_swaps_the_certificate_for_new_handshakes_only(
    nursery: trio.Nursery, tmp_path: Path, server_key: bytes, derpd_log: pytest.LogCaptureFixture
) -> None:
    ca_a, ca_b = trustme.CA(), trustme.CA()
    write_leaf(tmp_path, ca_a.issue_cert(HOST))
    store = CertStore(tmp_path, HOST, server_key)
    store.load()
    first_context = store.context
    pin_a = store.leaf_pin
    port = await serve_echo(nursery, lambda: store.context)
    port_cached = await serve_echo(nursery, lambda: first_context)  # a listener that never re-reads .context

    live = await dial(port, trusting(ca_a), HOST)
    await echo(live, b"before reload")

    write_leaf(tmp_path, ca_b.issue_cert(HOST))
    assert store.reload() is True
    assert store.leaf_pin != pin_a
    assert any(r.getMessage() == "tls_reloaded" for r in derpd_log.records)

    await echo(live, b"after reload, same connection" * 100)  # established connection unaffected
    assert cert_name_pin(peer_chain_der(live)[0]) == pin_a
    for p in (port, port_cached):
        fresh = await dial(p, trusting(ca_b), HOST)
        assert (fresh.version(), fresh.selected_alpn_protocol()) == ("TLSv1.3", "http/1.1")
        assert cert_name_pin(peer_chain_der(fresh)[0]) == store.leaf_pin
        assert parse_meta_certificate(peer_chain_der(fresh)[-1]) == server_key
        await echo(fresh, b"new cert")
        await fresh.aclose()
        cause = await dial_refused(p, trusting(ca_a), HOST)  # the old CA's cert is no longer served
        assert isinstance(cause, ssl.SSLCertVerificationError)

    # A bad replacement keeps the current certificate and says why.
    pin_b = store.leaf_pin
    (tmp_path / f"{HOST}.crt").write_bytes(b"garbage")
    derpd_log.clear()
    assert store.reload() is False
    assert store.leaf_pin == pin_b
    failed = [r for r in derpd_log.records if r.getMessage() == "tls_reload_failed"]
    assert failed and failed[0].levelno == logging.WARNING
    assert "no readable PEM certificate" in failed[0].fields["error"]  # type: ignore[attr-defined]
    fresh = await dial(port, trusting(ca_b), HOST)
    assert cert_name_pin(peer_chain_der(fresh)[0]) == pin_b
    await echo(fresh, b"still b")
    await fresh.aclose()
    await echo(live, b"and the first connection still works")
    await live.aclose()


async def test_reload_refuses_a_certificate_for_another_name_or_expired(tmp_path: Path, server_key: bytes) -> None:
    ca = trustme.CA()
    write_leaf(tmp_path, ca.issue_cert(HOST))
    store = CertStore(tmp_path, HOST, server_key)
    store.load()
    pin = store.leaf_pin
    write_leaf(tmp_path, ca.issue_cert("other.test"))
    assert store.reload() is False
    expired = ca.issue_cert(HOST, not_before=NOW - timedelta(days=400), not_after=NOW - timedelta(days=10))
    write_leaf(tmp_path, expired)
    assert store.reload() is False
    assert store.leaf_pin == pin


# --- pinned client ---------------------------------------------------------------------------------------


async def test_pinned_client_accepts_the_pin_and_refuses_another(
    nursery: trio.Nursery, tmp_path: Path, server_key: bytes
) -> None:
    store = CertStore(tmp_path, "127.0.0.1", server_key)
    store.load()
    assert store.pin is not None
    port = await serve_echo(nursery, lambda: store.context)

    tls = await dial(port, pinned_context(store.pin), "127.0.0.1")
    check_pin(tls, store.pin)  # explicit call agrees with the automatic one
    await echo(tls, b"ok")
    await tls.aclose()

    other = cert_name_pin(b"some other certificate")
    cause = await dial_refused(port, pinned_context(other), "127.0.0.1")
    assert isinstance(cause, CertPinError) and isinstance(cause, ssl.SSLCertVerificationError)
    assert "does not match the pin" in str(cause)

    unpinned = await dial(port, insecure(), None)  # a context without the automatic check
    with pytest.raises(CertError, match="does not match the pin"):
        check_pin(unpinned, other)
    await unpinned.aclose()


async def test_pinned_client_refuses_a_chain_of_several_real_certificates(
    nursery: trio.Nursery, dns_store: tuple[CertStore, trustme.CA, trustme.CA]
) -> None:
    store, _, _ = dns_store  # leaf + intermediate + meta: tlsdial wants exactly one non-meta cert
    assert store.leaf_pin is not None
    port = await serve_echo(nursery, lambda: store.context)
    cause = await dial_refused(port, pinned_context(store.leaf_pin), HOST)
    assert isinstance(cause, CertPinError) and "more than one certificate" in str(cause)


def test_pinned_context_validates_the_pin() -> None:
    for bad in ("sha256-raw:xyz", "abc", "sha256-raw:" + "AB" * 32):
        with pytest.raises(CertError, match="pin must be"):
            pinned_context(bad)


async def test_pinned_context_checks_blocking_sockets_too(
    nursery: trio.Nursery, tmp_path: Path, server_key: bytes
) -> None:
    store = CertStore(tmp_path, "127.0.0.1", server_key)
    store.load()
    assert store.pin is not None
    port = await serve_echo(nursery, lambda: store.context)

    def blocking_dial(pin: str) -> bytes:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with raw, pinned_context(pin).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"sync")
            return tls.recv(4)

    assert await trio.to_thread.run_sync(blocking_dial, store.pin) == b"sync"
    with pytest.raises(CertPinError):
        await trio.to_thread.run_sync(blocking_dial, cert_name_pin(b"other"))


@pytest.mark.parametrize("seed", ["known-invalid-x509-version", "known-name-attribute-typeerror", "not-der"])
def test_parse_meta_certificate_never_raises_on_a_peers_bytes(seed: str) -> None:
    """A peer's certificate chain is hostile input (fast_start_key, the probe): a v8 certificate raised
    cryptography's InvalidVersion and a BitString name attribute a TypeError (found by tests/fuzz)."""
    der = (Path(__file__).parent / "fuzz" / "corpus" / "meta_cert" / seed).read_bytes()
    assert parse_meta_certificate(der) is None
