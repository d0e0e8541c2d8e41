"""The ACME test harness on its own, without derpd: pebble and its DNS start and answer, the FaultProxy
does what each mode says, and an independent ACME client (certbot's ``acme`` library) gets certificates
from this pebble, directly and through the proxy. It also pins down what pebble 2.4 does with IP
identifiers, TLS-ALPN-01 SNI and AAAA records (see pebble.py's docstring), which derpd's tests rely on."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import http.client
import http.server
import ipaddress
import json
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from acme import challenges, client, crypto_util, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.b64 import b64encode
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC

from .conftest import MakePebble, MakeProxy
from .pebble import FaultProxy, dns_query, free_ports, https_get, need_tool, port_open

UTC = dt.UTC


# --- an independent ACME client ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _requests_trusts_the_ca(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def acme_client(directory_url: str, ca_file: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[client.ClientV2, JWK]:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))  # the acme library's requests.Session verifies with it
    key = JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    net = client.ClientNetwork(key, alg=ES256, user_agent="derpd-test-harness", timeout=10)
    directory = client.ClientV2.get_directory(directory_url, net)
    return client.ClientV2(directory, net), key


def register(acme: client.ClientV2, key: JWK, eab: tuple[str, str] | None = None) -> messages.RegistrationResource:
    binding = None
    if eab is not None:
        binding = messages.ExternalAccountBinding.from_data(key.public_key(), eab[0], eab[1], acme.directory)
    reg = messages.NewRegistration.from_data(terms_of_service_agreed=True, external_account_binding=binding)
    return acme.new_account(reg)


def key_authorization(token: str, key: JWK) -> str:
    return token + "." + b64encode(key.thumbprint()).decode()


def chall_type(challb: messages.ChallengeBody) -> str:
    chall = challb.chall
    jobj = getattr(chall, "jobj", None)  # acme 5 has no TLS-ALPN-01 class: UnrecognizedChallenge
    return str(jobj["type"]) if jobj is not None else str(chall.typ)


def chall_token(challb: messages.ChallengeBody) -> str:
    jobj = getattr(challb.chall, "jobj", None)
    return str(jobj["token"]) if jobj is not None else b64encode(challb.chall.token).decode()


def new_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def csr_for(identifier: str, key_pem: bytes) -> bytes:
    try:
        ip = ipaddress.ip_address(identifier)
    except ValueError:
        return crypto_util.make_csr(key_pem, [identifier])
    return crypto_util.make_csr(key_pem, ipaddrs=[ip])


def deadline(seconds: float = 30.0) -> dt.datetime:
    return dt.datetime.now() + dt.timedelta(seconds=seconds)


class Http01Responder:
    """A tiny HTTP server on 127.0.0.1:port answering /.well-known/acme-challenge/<token>."""

    def __init__(self, port: int) -> None:
        self.answers: dict[str, str] = {}
        self.hosts: list[str] = []
        responder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                responder.hosts.append(self.headers.get("Host", ""))
                token = self.path.removeprefix("/.well-known/acme-challenge/")
                body = responder.answers.get(token, "").encode()
                self.send_response(200 if body else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TlsAlpnResponder:
    """Answers TLS-ALPN-01 on 127.0.0.1:port with one challenge certificate (RFC 8737), made here by
    hand; records the SNI and ALPN of every validation connection."""

    def __init__(self, port: int, identifier: str, keyauth: str) -> None:
        self.snis: list[str | None] = []
        self.alpns: list[str | None] = []
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(identifier))
        except ValueError:
            san = x509.DNSName(identifier)
        now = dt.datetime.now(UTC)
        digest = hashlib.sha256(keyauth.encode()).digest()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(x509.Name([]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([san]), critical=True)
            .add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31"), b"\x04\x20" + digest),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.set_alpn_protocols(["acme-tls/1"])
        self.ctx.load_cert_chain(*self._files(cert, key))
        self.ctx.sni_callback = self._sni
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.1)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _files(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
        d = Path(tempfile.mkdtemp(prefix="alpn-"))
        (d / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / "k.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return str(d / "c.pem"), str(d / "k.pem")

    def _sni(self, sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext) -> None:
        self.snis.append(name)

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            with contextlib.suppress(OSError), self.ctx.wrap_socket(conn, server_side=True) as tls:
                self.alpns.append(tls.selected_alpn_protocol())

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.listener.close()


@contextlib.contextmanager
def http01(port: int) -> Iterator[Http01Responder]:
    r = Http01Responder(port)
    try:
        yield r
    finally:
        r.close()


def issue_http01(acme: client.ClientV2, key: JWK, responder: Http01Responder, name: str) -> tuple[bytes, str]:
    """(key PEM, fullchain PEM) for ``name`` by HTTP-01."""
    key_pem = new_key_pem()
    order = acme.new_order(csr_for(name, key_pem))
    for authz in order.authorizations:
        challb = next(c for c in authz.body.challenges if chall_type(c) == "http-01")
        assert isinstance(challb.chall, challenges.HTTP01)
        response, validation = challb.chall.response_and_validation(key)
        responder.answers[b64encode(challb.chall.token).decode()] = validation
        acme.answer_challenge(challb, response)
    done = acme.poll_and_finalize(order, deadline())
    assert done.fullchain_pem
    return key_pem, done.fullchain_pem


def serve_once_and_verify(
    key_pem: bytes, fullchain_pem: str, ctx: ssl.SSLContext, server_hostname: str
) -> dict[str, Any]:
    """Serve the certificate on a loopback TLS server and verify it as a client would: the peer cert."""
    d = Path(tempfile.mkdtemp(prefix="served-"))
    (d / "bundle.pem").write_bytes(key_pem + fullchain_pem.encode())
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(str(d / "bundle.pem"))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with contextlib.suppress(OSError), sctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            peer = tls.getpeercert()
            assert peer is not None
            return peer
    finally:
        t.join(5)
        listener.close()


# --- pebble and its DNS -------------------------------------------------------------------------------


def test_pebble_serves_its_directory_over_the_trustme_ca(make_pebble: MakePebble) -> None:
    pebble = make_pebble()
    status, _, body = https_get(pebble.directory_url, pebble.client_context())
    assert status == 200, body
    doc = json.loads(body)
    for name in ("newAccount", "newNonce", "newOrder", "revokeCert", "keyChange"):
        assert doc[name].startswith(pebble.base_url + "/"), doc
    assert doc["meta"]["externalAccountRequired"] is False
    assert pebble.directory_url == f"https://127.0.0.1:{pebble.port}/dir"
    # The CA file is a real trust anchor for 127.0.0.1 (and only that CA: the system store does not know it).
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(pebble.directory_url, ssl.create_default_context())
    # The issuing root (new each start) is a CA certificate.
    root = pebble.root_cert()
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert b"BEGIN CERTIFICATE" in pebble.root_pem()
    assert pebble.ca_file.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert "Disabling random VA sleeps" in pebble.log() and "reject 0% of good nonces" in pebble.log()


def test_challtestsrv_answers_every_name_with_loopback_and_no_aaaa(make_pebble: MakePebble) -> None:
    pebble = make_pebble()
    port = pebble.dns.dns_port
    for name in ("derp.test", "harness.test", "anything.at.all.example"):
        assert dns_query(port, name, 1) == [bytes([127, 0, 0, 1])], name
        assert dns_query(port, name, 28) == [], name  # -defaultIPv6 "": NOERROR, no AAAA record


def test_pebble_stops_and_starts_on_the_same_port_with_new_state(make_pebble: MakePebble) -> None:
    pebble = make_pebble()
    url, root = pebble.directory_url, pebble.root_pem()
    pebble.stop()
    assert not port_open(pebble.port)
    with pytest.raises(ConnectionRefusedError):
        https_get(url, pebble.client_context())
    pebble.start()
    assert pebble.directory_url == url
    assert https_get(url, pebble.client_context())[0] == 200
    assert pebble.root_pem() != root  # a new CA: everything issued before no longer chains to it
    assert pebble.starts == 2


def test_a_missing_binary_fails_with_the_package_to_install() -> None:
    with pytest.raises(pytest.fail.Exception, match="apt-get install pebble"):
        need_tool("pebble-that-does-not-exist")


# --- the fault proxy ------------------------------------------------------------------------------------


def proxy_get(
    proxy: FaultProxy, path: str, method: str = "GET", timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    return https_get(proxy.base_url + path, proxy.pebble.client_context(), method=method, timeout=timeout)


def test_proxy_passes_through_and_rewrites_pebbles_base(make_pebble: MakePebble, make_proxy: MakeProxy) -> None:
    pebble = make_pebble()
    proxy = make_proxy(pebble)
    status, _, body = proxy_get(proxy, "/dir")
    assert status == 200
    doc = json.loads(body)
    for name in ("newAccount", "newNonce", "newOrder"):
        assert doc[name].startswith(proxy.base_url + "/"), doc
    assert pebble.base_url not in body.decode()
    assert doc["newOrder"] == proxy.base_url + proxy.new_order_path
    status, headers, _ = proxy_get(proxy, "/nonce-plz", "HEAD")
    assert status == 200 and headers["replay-nonce"]
    assert proxy.base_url in headers["link"] and pebble.base_url not in headers["link"]
    assert proxy.count("/dir") == 1 and proxy.count("/nonce-plz", "HEAD") == 1 and proxy.count() == 2
    # Rewriting also covers what pebble did not build from the Host header.
    assert proxy._rewrite(f"x {pebble.base_url}/y".encode()) == f"x {proxy.base_url}/y".encode()


def test_proxy_refuse_stops_listening_and_comes_back(make_pebble: MakePebble, make_proxy: MakeProxy) -> None:
    proxy = make_proxy(make_pebble())
    kept = http.client.HTTPSConnection("127.0.0.1", proxy.port, timeout=5, context=proxy.pebble.client_context())
    kept.request("GET", "/dir")
    assert kept.getresponse().read()
    proxy.set_mode("refuse")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    with pytest.raises((OSError, http.client.HTTPException)):  # the kept-alive connection was cut too
        kept.request("GET", "/dir")
        kept.getresponse().read()
    kept.close()
    proxy.set_mode("pass")
    assert proxy_get(proxy, "/dir")[0] == 200


def test_proxy_hang_answers_nothing_until_the_mode_changes(make_pebble: MakePebble, make_proxy: MakeProxy) -> None:
    proxy = make_proxy(make_pebble())
    proxy.set_mode("hang")
    conn = http.client.HTTPSConnection("127.0.0.1", proxy.port, timeout=1.0, context=proxy.pebble.client_context())
    conn.request("GET", "/dir")
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.sock.settimeout(5)
    t0 = time.monotonic()
    proxy.set_mode("pass")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, ssl.SSLError, http.client.HTTPException)):
        conn.getresponse()  # dropped without an answer as soon as the mode moved
    assert time.monotonic() - t0 < 2
    conn.close()
    assert proxy_get(proxy, "/dir")[0] == 200
    assert proxy.count("/dir") == 2 and proxy.seen[0].status == 0 and proxy.seen[0].mode == "hang"


def test_proxy_error500_and_bad_json(make_pebble: MakePebble, make_proxy: MakeProxy) -> None:
    proxy = make_proxy(make_pebble())
    proxy.set_mode("error500")
    status, headers, body = proxy_get(proxy, "/dir")
    assert status == 500 and headers["content-type"] == "text/html" and body.startswith(b"<html>")
    proxy.set_mode("bad_json")
    for path in ("/dir", "/nonce-plz"):
        status, headers, body = proxy_get(proxy, path)
        assert status == 200 and headers["content-type"] == "application/json"
        with pytest.raises(ValueError):
            json.loads(body)
    proxy.set_mode("bad_json", path="/nonce-plz")
    assert json.loads(proxy_get(proxy, "/dir")[2])["newOrder"]
    status, headers, body = proxy_get(proxy, "/nonce-plz")
    assert status == 200 and headers["replay-nonce"] and body.startswith(b"<html>")


def test_proxy_ari_adds_renewal_info(make_pebble: MakePebble, make_proxy: MakeProxy) -> None:
    proxy = make_proxy(make_pebble())
    start = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    proxy.set_mode("ari", start=start, end=start + dt.timedelta(hours=1))
    doc = json.loads(proxy_get(proxy, "/dir")[2])
    assert doc["renewalInfo"] == proxy.base_url + "/renewal-info"
    assert doc["newOrder"] == proxy.base_url + proxy.new_order_path
    status, headers, body = proxy_get(proxy, "/renewal-info/aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE")
    assert status == 200 and headers["retry-after"] == "3600"
    assert json.loads(body) == {"suggestedWindow": {"start": "2030-01-02T03:04:05Z", "end": "2030-01-02T04:04:05Z"}}
    proxy.set_mode("pass")
    assert "renewalInfo" not in json.loads(proxy_get(proxy, "/dir")[2])


def test_proxy_answers_502_while_pebble_is_down(make_pebble: MakePebble, make_proxy: MakeProxy) -> None:
    pebble = make_pebble()
    proxy = make_proxy(pebble)
    pebble.stop()
    status, _, body = proxy_get(proxy, "/dir")
    assert status == 502 and b"pebble unreachable" in body
    pebble.start()
    assert proxy_get(proxy, "/dir")[0] == 200


# --- an ACME client end to end ------------------------------------------------------------------------


def test_acme_library_gets_a_certificate_by_http01(make_pebble: MakePebble, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves the pebble configuration (DNS, httpPort, validity) end to end with an independent client."""
    http_port, tls_port = free_ports(2)
    pebble = make_pebble(http_port=http_port, tls_port=tls_port, validity_seconds=30)
    acme, key = acme_client(pebble.directory_url, pebble.ca_file, monkeypatch)
    register(acme, key)
    with http01(http_port) as responder:
        key_pem, chain = issue_http01(acme, key, responder, "harness.test")
    assert responder.hosts and all(h.split(":")[0] == "harness.test" for h in responder.hosts), responder.hosts
    certs = x509.load_pem_x509_certificates(chain.encode())
    leaf = certs[0]
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["harness.test"]
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc) == dt.timedelta(seconds=29)
    assert len(certs) == 2  # leaf + intermediate: the root is not in the chain
    peer = serve_once_and_verify(key_pem, chain, pebble.ssl_context_for_issued(), "harness.test")
    assert ("DNS", "harness.test") in peer["subjectAltName"]
    with pytest.raises(ssl.SSLCertVerificationError):  # the name is checked
        serve_once_and_verify(key_pem, chain, pebble.ssl_context_for_issued(), "other.test")


def test_acme_library_through_the_proxy_and_rate_limited(
    make_pebble: MakePebble, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that starts at the proxy's directory stays on it for the whole issuance, and the
    rateLimited answer carries a nonce pebble accepts."""
    http_port, tls_port = free_ports(2)
    pebble = make_pebble(http_port=http_port, tls_port=tls_port, validity_seconds=30)
    proxy = make_proxy(pebble)
    acme, key = acme_client(proxy.directory_url, pebble.ca_file, monkeypatch)
    register(acme, key)
    proxy.set_mode("rate_limited", retry_after=7)
    with pytest.raises(messages.Error) as raised:
        acme.new_order(csr_for("proxied.test", new_key_pem()))
    assert raised.value.typ == "urn:ietf:params:acme:error:rateLimited"
    rejected = proxy.count(proxy.new_order_path, "POST")
    assert rejected == 1 and proxy.seen[-1].status == 429
    proxy.set_mode("pass")
    with http01(http_port) as responder:
        _, chain = issue_http01(acme, key, responder, "proxied.test")
    # One newOrder after the 429: the nonce it carried was good (a badNonce would have made the library retry).
    assert proxy.count(proxy.new_order_path, "POST") == rejected + 1
    assert all(s.status != 400 for s in proxy.seen), proxy.paths()
    assert {s.path.split("/")[1] for s in proxy.seen} >= {
        "dir",
        "nonce-plz",
        "sign-me-up",
        "order-plz",
        "finalize-order",
    }
    assert x509.load_pem_x509_certificates(chain.encode())[0]


def test_proxy_rate_limited_response_on_the_wire(make_pebble: MakePebble, make_proxy: MakeProxy) -> None:
    proxy = make_proxy(make_pebble())
    proxy.set_mode("rate_limited", retry_after=9)
    status, headers, body = https_get(
        proxy.base_url + proxy.new_order_path, proxy.pebble.client_context(), method="POST", body=b"{}"
    )
    assert status == 429 and headers["retry-after"] == "9" and headers["replay-nonce"]
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(body) == {"type": "urn:ietf:params:acme:error:rateLimited", "detail": "too many certificates"}
    status, _, _ = https_get(proxy.base_url + "/sign-me-up", proxy.pebble.client_context(), method="POST", body=b"{}")
    assert status != 429  # only newOrder is limited


def test_pebble_accepts_ip_identifiers_and_sends_reverse_dns_sni(
    make_pebble: MakePebble, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 8738 in pebble 2.4: an order for 127.0.0.1 offers tls-alpn-01 and http-01; the TLS-ALPN-01
    validation's SNI is 1.0.0.127.in-addr.arpa; the certificate names the IP address."""
    http_port, tls_port = free_ports(2)
    pebble = make_pebble(http_port=http_port, tls_port=tls_port, validity_seconds=30)
    acme, key = acme_client(pebble.directory_url, pebble.ca_file, monkeypatch)
    register(acme, key)
    for identifier, want_sni, offered in (
        ("127.0.0.1", "1.0.0.127.in-addr.arpa", {"tls-alpn-01", "http-01"}),
        ("alpn.test", "alpn.test", {"tls-alpn-01", "http-01", "dns-01"}),
    ):
        key_pem = new_key_pem()
        order = acme.new_order(csr_for(identifier, key_pem))
        (authz,) = order.authorizations
        assert {chall_type(c) for c in authz.body.challenges} == offered, identifier
        challb = next(c for c in authz.body.challenges if chall_type(c) == "tls-alpn-01")
        responder = TlsAlpnResponder(tls_port, identifier, key_authorization(chall_token(challb), key))
        try:
            acme.answer_challenge(challb, challenges.HTTP01Response())  # any {} payload answers a challenge
            done = acme.poll_and_finalize(order, deadline())
        finally:
            responder.close()
        assert responder.snis and set(responder.snis) == {want_sni}, responder.snis
        assert set(responder.alpns) == {"acme-tls/1"}
        leaf = x509.load_pem_x509_certificates(done.fullchain_pem.encode())[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if identifier == "127.0.0.1":
            assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
            assert san.get_values_for_type(x509.DNSName) == []
            peer = serve_once_and_verify(key_pem, done.fullchain_pem, pebble.ssl_context_for_issued(), "127.0.0.1")
            assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]
        else:
            assert san.get_values_for_type(x509.DNSName) == [identifier]


def test_eab_required_and_nonce_reject(make_pebble: MakePebble, monkeypatch: pytest.MonkeyPatch) -> None:
    kid, hmac_key = "kid-1", b64encode(b"k" * 32).decode()
    pebble = make_pebble(eab_required=True, eab_keys={kid: hmac_key})
    acme, key = acme_client(pebble.directory_url, pebble.ca_file, monkeypatch)
    assert acme.external_account_required()
    with pytest.raises(messages.Error) as raised:
        register(acme, key)
    assert raised.value.typ == "urn:ietf:params:acme:error:externalAccountRequired"
    with pytest.raises(messages.Error):
        register(acme, key, (kid, b64encode(b"x" * 32).decode()))  # the wrong key
    assert register(acme, key, (kid, hmac_key)).uri

    picky = make_pebble(nonce_reject=100)
    acme, key = acme_client(picky.directory_url, picky.ca_file, monkeypatch)
    with pytest.raises(messages.Error) as raised:  # the library retries a badNonce once, then gives up
        register(acme, key)
    assert raised.value.typ == "urn:ietf:params:acme:error:badNonce"


def test_pebble_rejects_a_bad_identifier(make_pebble: MakePebble, monkeypatch: pytest.MonkeyPatch) -> None:
    pebble = make_pebble()
    acme, key = acme_client(pebble.directory_url, pebble.ca_file, monkeypatch)
    register(acme, key)
    with pytest.raises(messages.Error) as raised:
        acme.new_order(csr_for("bad_name.test", new_key_pem()))
    assert raised.value.typ == "urn:ietf:params:acme:error:malformed" and "illegal character" in str(
        raised.value.detail
    )


def test_dns_query_helper_returns_none_without_a_server() -> None:
    (port,) = free_ports(1, udp_too=True)
    assert dns_query(port, "x.test", timeout=0.3) is None
