"""--certmode letsencrypt, piece by piece and in process: settings, error classes, back-off, the challenge
book, and the listeners answering a CA's validation over real sockets. tests/acme runs it all against pebble.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import random
import re
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
import trio
import trustme
from acme import errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from derpd.base import log
from derpd.base.errors import ConfigurationError
from derpd.config import ServeOptions, build, check_certificate_name
from derpd.net.acme import (
    LETSENCRYPT,
    LETSENCRYPT_STAGING,
    AcmeError,
    AcmeSettings,
    classify,
    deadline,
    directory_url,
)
from derpd.net.acme import _retry_after_seconds as retry_after_seconds
from derpd.net.tls import ACME_IDENTIFIER_OID, CertStore, acme_tls_alpn_certificate
from derpd.ops.acme import BACKOFF_BASE, BACKOFF_CHALLENGE, JITTER, NEXT_TYPE_DELAY, AcmeConfig, CertManager
from derpd.proto.keys import NodePrivate
from derpd.server.challenges import ChallengeBook, tls_alpn_server_name
from derpd.server.node import DerpServer

from .conftest import derpd_logger, start_server

GUARD = 10.0
# Never raw in a log line: C0 (tab too), DEL, C1, line separators, bidi controls, BOM (as tests/hostile).
RAW_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every line the "derpd" logger writes, debug included (log.setup may have stopped propagation)."""
    with derpd_logger(caplog, logging.DEBUG) as captured:
        yield captured


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("derp.example.com", "derp.example.com"),
        ("DERP.Example.COM.", "derp.example.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a-b.c-d.e", "a-b.c-d.e"),
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8::1", "2001:db8::1"),
    ],
)
def test_certificate_names_accepted(given: str, expected: str) -> None:
    assert check_certificate_name(given) == expected


@pytest.mark.parametrize(
    "bad",
    ["", "localhost", "bad_name!.test", "192.0.2.1]", "[2001:db8::1", "-x.test", "x-.test", "a..b",
     "*.example.com", "a b.test", "é.test", "a" * 64 + ".test", ("a" * 60 + ".") * 5 + "test"],
)
def test_certificate_names_refused(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        check_certificate_name(bad)


def _options(tmp_path: Path, **kw: object) -> ServeOptions:
    base: dict[str, object] = {
        "addr": "127.0.0.1:0",
        "stun_port": -1,
        "metrics_addr": "-1",
        "key_file": str(tmp_path / "derper.key"),
        "certmode": "letsencrypt",
        "hostname": "derp.example.com",
        "acme_directory": "https://127.0.0.1:9/dir",
    }
    base.update(kw)
    return ServeOptions(**base)  # type: ignore[arg-type]


def test_build_prepares_account_and_state(tmp_path: Path) -> None:
    cfg = build(_options(tmp_path, acme_email="ops@example.com"))
    assert cfg.acme is not None and cfg.settings.tls is cfg.acme.store
    assert not (tmp_path / "certs").exists()  # build only checks; serve prepares once logging is on
    cfg.acme.prepare()
    assert cfg.settings.challenges is cfg.acme.book and cfg.settings.http_port == 80
    certdir = tmp_path / "certs"
    assert cfg.acme.store.cert_path == certdir / "derp.example.com.pem" == cfg.acme.store.key_path
    key_file = cfg.acme.account_key_path
    assert key_file.parent == certdir and key_file.stat().st_mode & 0o777 == 0o600
    assert certdir.stat().st_mode & 0o777 == 0o700
    first = key_file.read_bytes()
    again = build(_options(tmp_path)).acme
    assert again is not None
    again.prepare()
    assert again.account_key_path.read_bytes() == first
    assert not cfg.acme.store.has_certificate and not cfg.acme.ready.is_set()


def test_workers_share_challenges_through_files(tmp_path: Path) -> None:
    cfg = build(_options(tmp_path, workers="2"))
    assert cfg.acme is not None and cfg.acme.book.directory == tmp_path / "certs" / "acme-challenges"
    assert build(_options(tmp_path)).acme.book.directory is None  # type: ignore[union-attr]
    writer, reader = ChallengeBook(tmp_path / "ch"), ChallengeBook(tmp_path / "ch")  # supervisor, a worker
    writer.add_http01("tok-2", "tok-2.thumb")
    writer.add_tls_alpn01("derp.example.com", "tls.thumb")
    writer.add_tls_alpn01("192.0.2.1", "ip.thumb")
    assert reader.http01(b"/.well-known/acme-challenge/tok-2") == b"tok-2.thumb"
    assert reader.tls_alpn01("derp.example.com") is not None
    assert reader.tls_alpn01("1.2.0.192.in-addr.arpa") is not None
    assert reader.tls_alpn01(None) is not None  # the one IP challenge
    assert reader.tls_alpn01("../certs") is None and reader.tls_alpn01("other.example.com") is None
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in (tmp_path / "ch").iterdir())
    writer.clear()
    assert list((tmp_path / "ch").iterdir()) == []
    assert reader.http01(b"/.well-known/acme-challenge/tok-2") is None and reader.tls_alpn01("derp.example.com") is None


def test_build_dry_run_creates_nothing(tmp_path: Path) -> None:
    cfg = build(_options(tmp_path), dry_run=True)
    assert cfg.acme is not None and not (tmp_path / "certs").exists()
    assert any(n.event == "acme" for n in cfg.notes)


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"hostname": "bad_name!"}, "neither an IP address nor a DNS name"),
        ({"hostname": ""}, "needs --hostname"),
        ({"acme_challenge": "http-01", "http_port": -1}, "needs the port-80 listener"),
        ({"acme_challenge": "dns-01"}, "must be auto"),
        ({"acme_eab_kid": "kid-1"}, "go together"),
        ({"acme_eab_kid": "kid-1", "acme_eab_key": "not base64!"}, "base64url"),
        ({"acme_directory": "http://ca.example/dir"}, "https://"),
        ({"acme_ca_file": "/nonexistent/ca.pem"}, "no such file"),
    ],
)
def test_bad_acme_settings_are_one_error(tmp_path: Path, kw: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigurationError, match=words):
        build(_options(tmp_path, **kw))


def test_unusable_account_key_is_refused(tmp_path: Path) -> None:
    cfg = build(_options(tmp_path))
    assert cfg.acme is not None
    cfg.acme.prepare()
    cfg.acme.account_key_path.chmod(0o640)
    with pytest.raises(ConfigurationError, match="must not be accessible by group or others"):
        cfg.acme.prepare()
    cfg.acme.account_key_path.chmod(0o600)
    cfg.acme.account_key_path.write_text("not a key")
    with pytest.raises(ConfigurationError, match="not a usable ACME account key"):
        cfg.acme.prepare()


def test_directory_aliases() -> None:
    assert directory_url("letsencrypt") == LETSENCRYPT
    assert directory_url(" Staging ") == LETSENCRYPT_STAGING
    assert directory_url("https://acme.zerossl.com/v2/DV90") == "https://acme.zerossl.com/v2/DV90"


# --- what a failure means ------------------------------------------------------------------------


def _problem(code: str, detail: str = "detail") -> messages.Error:
    return messages.Error(typ=f"urn:ietf:params:acme:error:{code}", detail=detail)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("rateLimited", "rate_limited"),
        ("badNonce", "bad_nonce"),
        ("externalAccountRequired", "account"),
        ("accountDoesNotExist", "account"),
        ("connection", "challenge_failed"),
        ("unauthorized", "challenge_failed"),
        ("tls", "challenge_failed"),
        ("serverInternal", "ca_error"),
        ("malformed", "ca_error"),
    ],
)
def test_problem_documents_are_classified(code: str, reason: str) -> None:
    got = classify(_problem(code, "line one\nline two"))
    assert got.reason == reason and "\n" not in got.detail and code in got.detail


def test_rate_limit_carries_retry_after() -> None:
    assert classify(_problem("rateLimited"), "120").retry_after == 120
    in_a_minute = (datetime.now(UTC) + timedelta(seconds=60)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    got = classify(_problem("rateLimited"), in_a_minute).retry_after
    assert got is not None and 55 < got <= 60
    assert classify(_problem("rateLimited"), "soon").retry_after is None
    assert retry_after_seconds("99999999999999999999") == 10**9
    assert retry_after_seconds("Mon, 01 Jan 2001 00:00:00 GMT") == 0.0


def test_transport_failures_are_classified() -> None:
    assert classify(requests.exceptions.ConnectionError("refused")).reason == "unreachable"
    assert classify(requests.exceptions.SSLError("bad cert")).reason == "unreachable"
    assert classify(requests.exceptions.ReadTimeout("slow")).reason == "timeout"
    assert classify(requests.exceptions.ConnectTimeout("slow")).reason == "timeout"
    assert classify(errors.TimeoutError()).reason == "timeout"
    response = requests.Response()
    response.status_code = 502
    response.headers["Retry-After"] = "30"
    got = classify(errors.ClientError(response))
    assert (got.reason, got.retry_after) == ("ca_error", 30) and "502" in got.detail
    not_json = requests.exceptions.JSONDecodeError("Expecting value", "<html>", 0)
    for junk in (ValueError("Expecting"), not_json, KeyError("newOrder"), errors.MissingNonce(response)):
        assert classify(junk).reason == "bad_response"


def test_failed_validation_names_the_challenge() -> None:
    challenge = messages.ChallengeBody(
        chall=messages.challenges.HTTP01(token=b"x" * 32),
        error=_problem("connection", "Connection refused"),
        status=messages.STATUS_INVALID,
    )
    authz = messages.Authorization(
        identifier=messages.Identifier(typ=messages.IDENTIFIER_FQDN, value="derp.example.com"),
        challenges=[challenge],
        status=messages.STATUS_INVALID,
    )
    got = classify(errors.ValidationError([messages.AuthorizationResource(body=authz, uri="https://ca/authz/1")]))
    assert got.reason == "challenge_failed"
    assert "derp.example.com" in got.detail and "http-01" in got.detail and "Connection refused" in got.detail


async def test_deadline_is_a_timeout_error() -> None:
    with pytest.raises(AcmeError) as caught, deadline(0.05):
        await trio.sleep_forever()
    assert caught.value.reason == "timeout"


# --- back-off ------------------------------------------------------------------------------------


def _manager(tmp_path: Path, **kw: object) -> CertManager:
    key = NodePrivate.generate()
    store = CertStore(tmp_path, "derp.example.com", key.public, bundle="derp.example.com.pem")
    config = AcmeConfig("derp.example.com", tmp_path, AcmeSettings(directory="https://127.0.0.1:9/dir"), **kw)  # type: ignore[arg-type]
    return CertManager(config, store, ChallengeBook(), rng=random.Random(7))


def test_backoff_doubles_with_jitter_and_caps(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    delays = [m._failed(AcmeError("unreachable", "refused")) for _ in range(14)]
    for n, d in enumerate(delays[:8]):
        nominal = BACKOFF_BASE * 2**n
        assert nominal * (1 - JITTER) <= d <= nominal * (1 + JITTER)
    assert max(delays) <= 3600 * (1 + JITTER) and delays[-1] >= 3600 * (1 - JITTER)
    assert m.failures["unreachable"] == 14 and m.last_error == "unreachable: refused"


def test_rate_limit_waits_at_least_retry_after(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    assert m._failed(AcmeError("rate_limited", "slow down", retry_after=900)) >= 900
    assert m._failed(AcmeError("rate_limited", "slow down", retry_after=10**9)) == 7 * 86400


def test_auto_tries_the_other_challenge_type_at_once(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    m._kinds_failed.add("tls-alpn-01")
    assert m._failed(AcmeError("challenge_failed", "tls-alpn-01: connection refused")) == NEXT_TYPE_DELAY
    m._kinds_failed.add("http-01")
    d = m._failed(AcmeError("challenge_failed", "http-01: connection refused"))
    assert BACKOFF_CHALLENGE * (1 - JITTER) <= d <= BACKOFF_CHALLENGE * (1 + JITTER)
    assert m._kinds() == ["tls-alpn-01", "http-01"]
    assert _manager(tmp_path, http01=False)._kinds() == ["tls-alpn-01"]
    assert _manager(tmp_path, challenge="http-01")._kinds() == ["http-01"]


# --- the challenge book --------------------------------------------------------------------------


def test_http01_answers_only_pending_tokens() -> None:
    book = ChallengeBook()
    assert not book.pending
    book.add_http01("tok_EN-1", "tok_EN-1.thumb")
    assert book.pending
    assert book.http01(b"/.well-known/acme-challenge/tok_EN-1") == b"tok_EN-1.thumb"
    for path in (b"/.well-known/acme-challenge/other", b"/.well-known/acme-challenge/", b"/tok_EN-1",
                 b"/.well-known/acme-challenge/tok_EN-1/", b"/.well-known/acme-challenge/../x"):
        assert book.http01(path) is None
    assert book.http01_answered == 1
    book.clear()
    assert book.http01(b"/.well-known/acme-challenge/tok_EN-1") is None and not book.pending


def test_tls_alpn_server_names() -> None:
    assert tls_alpn_server_name("Derp.Example.com.") == "derp.example.com"
    assert tls_alpn_server_name("127.0.0.1") == "1.0.0.127.in-addr.arpa"
    assert tls_alpn_server_name("2001:db8::1").endswith(".8.b.d.0.1.0.0.2.ip6.arpa")
    book = ChallengeBook()
    book.add_tls_alpn01("127.0.0.1", "a.b")
    assert book.tls_alpn01("1.0.0.127.IN-ADDR.ARPA") is not None
    assert book.tls_alpn01(None) is not None  # no SNI: the one pending IP challenge
    assert book.tls_alpn01("derp.example.com") is None


@pytest.mark.parametrize("identifier", ["derp.example.com", "192.0.2.1", "2001:db8::1"])
def test_tls_alpn_certificate(identifier: str) -> None:
    cert_pem, key_pem = acme_tls_alpn_certificate(identifier, "token.thumbprint")
    cert = x509.load_pem_x509_certificate(cert_pem)
    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(b"token.thumbprint").digest()  # type: ignore[attr-defined]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    try:
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(identifier)]
    except ValueError:
        assert san.get_values_for_type(x509.DNSName) == [identifier]
    assert serialization.load_pem_private_key(key_pem, None).public_key() == cert.public_key()


# --- the listeners, over real sockets ------------------------------------------------------------


async def _acme_server(
    nursery: trio.Nursery, tmp_path: Path, *, with_cert: bool
) -> tuple[DerpServer, ChallengeBook, trustme.CA]:
    """A TLS derpd with a ChallengeBook, as --certmode letsencrypt builds it; its certificate (when
    asked for) comes from a test CA instead of an ACME CA."""
    key = NodePrivate.generate()
    ca = trustme.CA()
    store = CertStore(tmp_path, "derp.example.com", key.public, bundle="derp.example.com.pem")
    if with_cert:
        issued = ca.issue_cert("derp.example.com")
        pem = issued.private_key_pem.bytes() + b"".join(p.bytes() for p in issued.cert_chain_pems)
        store.cert_path.write_bytes(pem)
        store.install_files()
    book = ChallengeBook()
    server = await start_server(nursery, key, tls=store, challenges=book, http_port=0, hostname="derp.example.com")
    return server, book, ca


async def _tls(port: int, ctx: ssl.SSLContext, sni: str | None) -> trio.SSLStream[trio.SocketStream]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, ctx, server_hostname=sni, https_compatible=True)
    with trio.fail_after(GUARD):
        await tls.do_handshake()
    return tls


def _acme_client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["acme-tls/1"])
    return ctx


async def test_no_certificate_yet_fails_fast_with_an_alert(nursery: trio.Nursery, tmp_path: Path) -> None:
    server, _, ca = await _acme_server(nursery, tmp_path, with_cert=False)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    started = trio.current_time()
    with pytest.raises(trio.BrokenResourceError) as caught:
        await _tls(server.port, ctx, "derp.example.com")
    assert "INTERNAL_ERROR" in str(caught.value.__cause__).upper()
    assert trio.current_time() - started < 2.0  # an alert at once, not the 10 s handshake deadline
    assert server.tls_handshake_failures == 1


async def test_tls_alpn_challenge_is_answered_and_clients_are_not_disturbed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server, book, ca = await _acme_server(nursery, tmp_path, with_cert=True)
    # Nothing pending: a CA's validation connection is refused.
    with pytest.raises(trio.BrokenResourceError):
        await _tls(server.port, _acme_client_context(), "derp.example.com")
    book.add_tls_alpn01("derp.example.com", "tok.thumb")
    tls = await _tls(server.port, _acme_client_context(), "derp.example.com")
    assert tls.selected_alpn_protocol() == "acme-tls/1"
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    ext = x509.load_der_x509_certificate(der).extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.value.value[2:] == hashlib.sha256(b"tok.thumb").digest()  # type: ignore[attr-defined]
    with trio.fail_after(GUARD):
        assert await tls.receive_some(100) == b""  # and then nothing: the server closes
    assert book.tls_alpn01_answered == 1
    # A DERP client at the same time, with the same SNI, gets the real certificate and HTTP.
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.set_alpn_protocols(["http/1.1"])
    client = await _tls(server.port, ctx, "derp.example.com")
    await client.send_all(b"GET /derp/probe HTTP/1.1\r\nHost: derp.example.com\r\n\r\n")
    with trio.fail_after(GUARD):
        assert (await client.receive_some(1000)).startswith(b"HTTP/1.1 200")
    await client.aclose()


async def test_http01_on_port_80(nursery: trio.Nursery, tmp_path: Path) -> None:
    server, book, _ = await _acme_server(nursery, tmp_path, with_cert=True)
    book.add_http01("tok-1", "tok-1.thumb")

    async def get(method: bytes, path: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", server.http_addrs[0][1])
        async with stream:
            head = b" HTTP/1.1\r\nHost: derp.example.com\r\nConnection: close\r\n\r\n"
            await stream.send_all(method + b" " + path + head)
            out = b""
            with trio.fail_after(GUARD):
                while chunk := await stream.receive_some(4096):
                    out += chunk
        return out

    ok = await get(b"GET", b"/.well-known/acme-challenge/tok-1")
    assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"\r\n\r\ntok-1.thumb")
    assert (await get(b"GET", b"/.well-known/acme-challenge/nope")).startswith(b"HTTP/1.1 404")
    assert (await get(b"POST", b"/.well-known/acme-challenge/tok-1")).startswith(b"HTTP/1.1 404")
    assert (await get(b"GET", b"/other")).startswith(b"HTTP/1.1 302")  # the rest still redirects to https
    assert book.http01_answered == 1


async def test_hostile_client_hellos_are_closed_and_the_listener_keeps_serving(
    nursery: trio.Nursery, tmp_path: Path, debug_log: pytest.LogCaptureFixture
) -> None:
    """Garbage, truncated and lying ClientHellos on a letsencrypt-mode listener: every connection is closed
    (at once, or at the head deadline for a stall), none gets the challenge certificate, and a real client
    still gets in afterwards. A hello the look-ahead refuses goes on to OpenSSL as any other would."""
    key = NodePrivate.generate()
    ca = trustme.CA()
    store = CertStore(tmp_path, "derp.example.com", key.public, bundle="derp.example.com.pem")
    issued = ca.issue_cert("derp.example.com")
    store.cert_path.write_bytes(issued.private_key_pem.bytes() + b"".join(p.bytes() for p in issued.cert_chain_pems))
    store.install_files()
    book = ChallengeBook()
    book.add_tls_alpn01("derp.example.com", "tok.thumb")
    server = await start_server(nursery, key, tls=store, challenges=book, head_timeout=0.5)
    rng = random.Random(1)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello_ctx = _acme_client_context()
    hello_obj = hello_ctx.wrap_bio(incoming, outgoing, server_hostname="derp.example.com")
    with pytest.raises(ssl.SSLWantReadError):
        hello_obj.do_handshake()
    hello = outgoing.read()
    attacks = [rng.randbytes(rng.randrange(1, 600)) for _ in range(40)]
    attacks += [hello[:n] for n in range(1, len(hello), 37)]  # truncated: a stall until the deadline
    attacks += [b"\x16\x03\x01\xff\xff" + hello[5:], b"\x16\x03\x01\x00\x00", b"GET / HTTP/1.1\r\n\r\n"]
    attacks += [hello[:9] + b"\xff" + hello[10:]]  # a handshake length that lies

    async def attack(data: bytes) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(data)
            with trio.fail_after(GUARD):
                while True:
                    try:
                        chunk = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        return
                    if not chunk:
                        return
                    # An alert, or (for a hello only OpenSSL still accepts) its normal ServerHello.
                    assert chunk[0] in (21, 22)

    async with trio.open_nursery() as attackers:
        for data in attacks:
            attackers.start_soon(attack, data)
    assert book.tls_alpn01_answered == 0
    # What it logged (at debug, so every line the attacks caused): nothing at error level, every line
    # bounded and escaped.
    formatter = log.KeyValueFormatter()
    assert debug_log.records, "the attacks left no log line at all"
    for record in debug_log.records:
        line = formatter.format(record)
        assert record.levelno < logging.ERROR and "Traceback" not in line, line
        assert len(line.encode()) <= 2048 and not RAW_CONTROL.search(line), line
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    client = await _tls(server.port, ctx, "derp.example.com")
    await client.send_all(b"GET /derp/probe HTTP/1.1\r\nHost: derp.example.com\r\n\r\n")
    with trio.fail_after(GUARD):
        assert (await client.receive_some(1000)).startswith(b"HTTP/1.1 200")
    await client.aclose()


def test_a_certificate_that_cannot_be_saved_is_a_failure_and_the_old_one_serves(tmp_path: Path) -> None:
    """OpenSSL loads the key from the bundle file: unsaved, the new pair cannot be served, so the order
    counts as failed (reason storage, backed off) instead of being logged as issued."""
    m = _manager(tmp_path)
    ca = trustme.CA()
    old = ca.issue_cert("derp.example.com")
    m.store.cert_path.write_bytes(old.private_key_pem.bytes() + b"".join(p.bytes() for p in old.cert_chain_pems))
    served = m.store.install_files()
    new = ca.issue_cert("derp.example.com")
    m.store.cert_path.unlink()
    m.store.cert_path.mkdir()  # the rename onto it fails
    chain = b"".join(p.bytes() for p in new.cert_chain_pems)
    with pytest.raises(AcmeError) as caught:
        m._store_bundle(new.private_key_pem.bytes(), chain)
    assert caught.value.reason == "storage" and "keeps serving" in caught.value.detail
    assert m.store.leaf_der == served.public_bytes(serialization.Encoding.DER)
