"""TLS for derpd: ``--certmode manual``, self-signed IP certificates, the fast-start meta certificate, pins.

Behaviour follows ``cmd/derper/cert.go`` (manual mode) and ``derp/derpserver`` (meta certificate):

* ``<certdir>/<hostname>.crt`` + ``.key``; the leaf must cover the hostname (Go's ``VerifyHostname``:
  subjectAltName only, the CN is ignored); a DNS hostname must be the client's SNI, an IP hostname
  accepts any SNI or none. An IP hostname with neither file present gets a self-signed ECDSA P-256
  certificate (1 year, IP SAN) written to the cert dir, trusted by clients through the DERP map's
  ``CertName: "sha256-raw:<hex>"`` pin.
* The meta certificate (self-signed ed25519, CN ``derpkey<hex server key>``, serial = protocol version)
  is served after the real chain. In TLS 1.3 the chain is encrypted and a Tailscale client that finds it
  skips the 101 round trip ("fast start").
* Beyond derper: :meth:`CertStore.reload` (SIGHUP) swaps the certificate for new handshakes without
  touching established connections, and keeps the old one if the new files are unusable.

Python's ``ssl`` has no in-memory certificate loading, so the chain (leaf + intermediates + meta) goes
through a temporary file in a private directory; the private key is read by OpenSSL from its own file and
never copied.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import secrets
import ssl
import tempfile
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import trio

from derpd.base import log
from derpd.base.errors import ConfigurationError
from derpd.base.files import is_empty_file, write_atomic
from derpd.base.text import one_line
from derpd.net.addr import ip_or_none
from derpd.proto.frames import PROTOCOL_VERSION
from derpd.proto.keys import KEY_LEN, NodeKey

# cryptography is imported inside the functions that use it, never at the top: it costs ~8 MB of RSS
# (its Rust extension and the x509 modules), which a plain-HTTP node never needs. Everything that
# builds or reads a certificate (``CertStore.load``, pins, the meta certificate) loads it on first use.
if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

__all__ = [
    "ACME_TLS_ALPN",
    "ALPN_PROTOCOLS",
    "META_CN_PREFIX",
    "PIN_PREFIX",
    "CertError",
    "CertPinError",
    "CertStore",
    "acme_tls_alpn_certificate",
    "acme_tls_alpn_context",
    "cert_file_stem",
    "cert_name_pin",
    "check_pin",
    "fast_start_key",
    "follow_certificate",
    "meta_certificate",
    "parse_meta_certificate",
    "peer_chain_der",
    "pinned_context",
    "self_signed_ip_certificate",
    "verify_hostname",
]

META_CN_PREFIX = "derpkey"  # derpconst.MetaCertCommonNamePrefix
PIN_PREFIX = "sha256-raw:"  # DERPNode.CertName form that pins the leaf's SHA-256
ALPN_PROTOCOLS = ["http/1.1"]
META_VALIDITY = timedelta(days=30)  # either side of now; Windows wants both bounds set
_UNSAFE_HOSTNAME_CHARS = re.compile(r"[^A-Za-z0-9.-]")
_HEX64 = re.compile(r"[0-9A-Fa-f]{64}")
PIN_RE = re.compile(PIN_PREFIX + r"[0-9a-f]{64}")  # a whole CertName pin
# A certificate whose notBefore is this little ahead of our clock is still served (a CA's clock, or
# ours, a little off): clients' clocks differ from ours by as much anyway.
NOT_BEFORE_SKEW = timedelta(minutes=5)
ACME_TLS_ALPN = "acme-tls/1"  # RFC 8737
ACME_IDENTIFIER_DOTTED = "1.3.6.1.5.5.7.1.31"  # id-pe-acmeIdentifier
if TYPE_CHECKING:
    ACME_IDENTIFIER_OID: x509.ObjectIdentifier
else:

    def __getattr__(name: str) -> Any:
        """``ACME_IDENTIFIER_OID``, an ``x509.ObjectIdentifier``, made when first asked for (see above)."""
        if name == "ACME_IDENTIFIER_OID":
            from cryptography import x509  # noqa: PLC0415 (weight, see above)

            return x509.ObjectIdentifier(ACME_IDENTIFIER_DOTTED)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class CertError(ConfigurationError):
    """A certificate or key cannot be used; the message is one line meant for the operator."""


class CertPinError(CertError, ssl.SSLCertVerificationError):
    """The peer's certificate does not match the pin.

    Also an ``ssl.SSLCertVerificationError`` so that code which already reports certificate failures
    (and trio, which turns ``ssl.SSLError`` during a handshake into ``BrokenResourceError``) treats it
    like any other verification failure.
    """

    def __str__(self) -> str:  # SSLError's __str__ would print the args tuple
        return str(self.args[0]) if self.args else "certificate does not match the pin"


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)



# --- the meta certificate (fast start) ---------------------------------------------------------------


def _is_issuer_key(key: object) -> TypeGuard[CertificateIssuerPrivateKeyTypes]:
    """Whether ``key`` is a private key that can sign a certificate."""
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa  # noqa: PLC0415 (weight)

    kinds = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, dsa.DSAPrivateKey)
    return isinstance(key, (*kinds, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey))


def _long_common_name(cn: str) -> x509.NameAttribute[str]:
    """A CN longer than RFC 5280's 64-character bound, as Go writes without complaint.

    ``derpkey`` + 64 hex is 71 characters; cryptography refuses that unless told not to validate
    (``_validate=False``, which then warns; the warning is expected here and silenced).
    """
    from cryptography import x509  # noqa: PLC0415 (weight, see the top)
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False)


def meta_certificate(server_public: bytes, *, now: datetime | None = None) -> bytes:
    """DER of derpserver's meta cert, which carries the server key to TLS 1.3 clients.

    Self-signed with a throwaway ed25519 key (nobody verifies the signature; it only has to parse),
    Subject = Issuer = CN ``derpkey<64 lowercase hex>``, serial = protocol version, valid from 30 days
    ago to 30 days ahead, and a critical BasicConstraints (CA false) as Go writes for
    ``BasicConstraintsValid: true`` (macOS wants it when subject == issuer).
    """
    from cryptography import x509  # noqa: PLC0415 (weight, see the top)
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: PLC0415

    if len(server_public) != KEY_LEN:
        raise ValueError(f"server public key must be {KEY_LEN} bytes")
    t = _now(now)
    name = x509.Name([_long_common_name(META_CN_PREFIX + server_public.hex())])
    signer = ed25519.Ed25519PrivateKey.generate()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.public_key())
        .serial_number(PROTOCOL_VERSION)
        .not_valid_before(t - META_VALIDITY)
        .not_valid_after(t + META_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(signer, None)
    )
    return cert.public_bytes(serialization.Encoding.DER)


def parse_meta_certificate(der: bytes) -> NodeKey | None:
    """The server public key if ``der`` is a meta cert (derphttp's parseMetaCert), else None.

    Accepted as the Go client does: CN starts with ``derpkey`` followed by exactly 64 hex digits, and
    the serial number fits in 8 bits (protocol versions up to 255).
    """
    from cryptography import x509  # noqa: PLC0415 (weight, see the top)

    try:
        cert = x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion):  # bytes from the peer: whatever they are, not a meta cert
        return None
    cn = _common_name(cert)
    if not cn.startswith(META_CN_PREFIX):
        return None
    body = cn[len(META_CN_PREFIX) :]
    if not _HEX64.fullmatch(body) or cert.serial_number.bit_length() > 8:
        return None
    return NodeKey(bytes.fromhex(body))


def _common_name(cert: x509.Certificate) -> str:
    """The subject CN, or "" (also for a subject cryptography cannot decode)."""
    from cryptography.x509.oid import NameOID  # noqa: PLC0415 (weight, see the top)

    try:
        with warnings.catch_warnings():  # the meta cert's 71-character CN is over RFC 5280's bound; expected
            warnings.simplefilter("ignore")
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (ValueError, TypeError):  # TypeError: an attribute cryptography cannot type (a BitString value)
        return ""
    value = cns[0].value if cns else ""
    return value if isinstance(value, str) else ""


def peer_chain_der(ssl_object: Any) -> list[bytes]:
    """The certificates the peer sent, leaf first, as DER, unverified.

    Accepts an ``ssl.SSLObject``/``ssl.SSLSocket`` or a ``trio.SSLStream``. Uses the public
    ``get_unverified_chain()`` (Python >= 3.13) when present, else the private ``_sslobj`` method that
    exists since 3.10; trio does not expose its SSLObject, so for an SSLStream this reads trio's
    private ``_ssl_object`` attribute.
    """
    obj = getattr(ssl_object, "_ssl_object", ssl_object)  # trio.SSLStream -> its ssl.SSLObject
    public = getattr(obj, "get_unverified_chain", None)
    if public is not None:
        chain = public()
    else:
        sslobj = getattr(obj, "_sslobj", None)
        if sslobj is None:
            raise TypeError(f"not a TLS connection: {type(ssl_object).__name__}")
        chain = sslobj.get_unverified_chain()
    out: list[bytes] = []
    for cert in chain or ():
        out.append(cert if isinstance(cert, bytes) else cert.public_bytes(ssl._ssl.ENCODING_DER))  # type: ignore[attr-defined]
    return out


def fast_start_key(ssl_object: Any) -> NodeKey | None:
    """Client side: the server key from a meta cert if fast start applies, else None.

    As derphttp: only on TLS 1.3 (where the chain was encrypted), any position in the chain.
    """
    obj = getattr(ssl_object, "_ssl_object", ssl_object)
    if obj.version() != "TLSv1.3":
        return None
    for der in peer_chain_der(obj):
        key = parse_meta_certificate(der)
        if key is not None:
            return key
    return None


# --- self-signed IP certificates and pins ------------------------------------------------------------


def _plus_one_year(t: datetime) -> datetime:
    try:
        return t.replace(year=t.year + 1)
    except ValueError:  # Feb 29 -> Mar 1, as Go's AddDate(1, 0, 0) normalises
        return t.replace(year=t.year + 1, month=3, day=1)


def self_signed_ip_certificate(
    ip: str, *, now: datetime | None = None, key: CertificateIssuerPrivateKeyTypes | None = None
) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for an IP-only relay, as derper's createSelfSignedIPCert.

    ECDSA P-256, random 128-bit serial, CN and IP SAN = ip, valid 1 year from now (longer is refused by
    macOS), digitalSignature+keyEncipherment, serverAuth, BasicConstraints CA false. The key is SEC1
    ("EC PRIVATE KEY") like Go's MarshalECPrivateKey. With ``key``, the certificate is made for that
    key instead of a new one (the key PEM returned is then that key's).
    """
    from cryptography import x509  # noqa: PLC0415 (weight, see the top)
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise CertError(f"not an IP address: {ip!r}") from None
    t = _now(now)
    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(secrets.randbelow((1 << 128) - 1) + 1)
        .not_valid_before(t)
        .not_valid_after(_plus_one_year(t))
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(addr)]), critical=False)
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# --- ACME TLS-ALPN-01 (RFC 8737) -----------------------------------------------------------------------


def acme_tls_alpn_certificate(
    identifier: str, key_authorization: str, *, now: datetime | None = None
) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) that answers a TLS-ALPN-01 challenge for ``identifier``.

    Self-signed, short-lived, with the identifier as its only subjectAltName (a DNS name, or an IP
    address as RFC 8738 wants) and the critical acmeIdentifier extension holding the SHA-256 of the
    key authorization, DER-encoded as an OCTET STRING. The CA looks at nothing else.
    """
    from cryptography import x509  # noqa: PLC0415 (weight, see the top)
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    t = _now(now)
    ip = ip_or_none(identifier)
    san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(ip)) if ip else x509.DNSName(identifier)
    digest = hashlib.sha256(key_authorization.encode()).digest()
    key = ec.generate_private_key(ec.SECP256R1())
    oid = x509.ObjectIdentifier(ACME_IDENTIFIER_DOTTED)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "derpd acme-tls/1 challenge")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(secrets.randbelow((1 << 128) - 1) + 1)
        .not_valid_before(t - timedelta(minutes=5))
        .not_valid_after(t + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.UnrecognizedExtension(oid, b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def acme_tls_alpn_context(identifier: str, key_authorization: str) -> ssl.SSLContext:
    """A server context that offers only ``acme-tls/1`` and the challenge certificate (RFC 8737 §3)."""
    cert_pem, key_pem = acme_tls_alpn_certificate(identifier, key_authorization)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ACME_TLS_ALPN])
    ctx.num_tickets = 0
    with tempfile.TemporaryDirectory(prefix="derpd-acme-") as tmp:  # mode 0700; Python's ssl loads files only
        path = Path(tmp) / "challenge.pem"
        path.write_bytes(key_pem + cert_pem)
        ctx.load_cert_chain(path, path)
    return ctx


def cert_name_pin(cert_der: bytes) -> str:
    """The DERP map ``CertName`` that pins this exact leaf: ``sha256-raw:<lowercase hex>``."""
    return PIN_PREFIX + hashlib.sha256(cert_der).hexdigest()



def _dns_matches(pattern: str, host: str) -> bool:
    """Go's matchHostnames: exact, or a whole ``*`` as the left-most label standing for one label."""
    pattern = pattern.lower().removesuffix(".")
    if not pattern or not host or pattern == "*":
        return False
    p_labels, h_labels = pattern.split("."), host.split(".")
    if len(p_labels) != len(h_labels):
        return False
    for i, (p, h) in enumerate(zip(p_labels, h_labels, strict=True)):
        if i == 0 and p == "*" and h:
            continue
        if p != h:
            return False
    return True


def verify_hostname(cert: x509.Certificate, hostname: str) -> None:
    """Raise CertError unless ``cert`` is valid for ``hostname`` (Go's x509 VerifyHostname rules).

    Only subjectAltName counts (Go ignores the CN since 1.15): IP SAN for an IP, DNS SAN (wildcards
    for exactly one left-most label) for a name; compared case-insensitively, trailing dot ignored.
    """
    from cryptography import x509  # noqa: PLC0415 (weight, see the top)

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertError(
            f"certificate has no subjectAltName, so it is not valid for {hostname!r} (the CN is not used)"
        ) from None
    ip = ip_or_none(hostname)
    if ip is not None:
        names = [str(a) for a in san.get_values_for_type(x509.IPAddress)]
        if any(a == ip for a in san.get_values_for_type(x509.IPAddress)):
            return
        raise CertError(f"certificate is not valid for IP {ip}; its IP SANs are {names or 'none'}")
    host = hostname.lower().removesuffix(".")
    dns = san.get_values_for_type(x509.DNSName)
    if any(_dns_matches(p, host) for p in dns):
        return
    raise CertError(f"certificate is not valid for {hostname!r}; its DNS SANs are {dns or 'none'}")


# --- the client side of a pin ------------------------------------------------------------------------


class _PinnedSSLObject(ssl.SSLObject):
    """Checks the pin the moment the handshake completes, so a caller cannot forget to."""

    def do_handshake(self) -> None:
        super().do_handshake()
        check_pin(self, getattr(self.context, "derp_pin", ""))


class _PinnedSSLSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        check_pin(self, getattr(self.context, "derp_pin", ""))


def _check_pin_format(pin: str) -> None:
    if not PIN_RE.fullmatch(pin):
        raise CertError(f"pin must be {PIN_PREFIX} followed by 64 lowercase hex digits, got {pin!r}")


def pinned_context(pin: str) -> ssl.SSLContext:
    """A client context that trusts exactly the leaf whose ``sha256-raw:`` hash is ``pin``.

    Like Tailscale's tlsdial ``SetConfigExpectedCertHash``: no CA or hostname verification by OpenSSL;
    instead :func:`check_pin` runs automatically when the handshake completes (the SSLObject class of
    this context calls it), failing the handshake with :class:`CertPinError`. Callers that build their
    own SSLObject class on top of this context must call ``check_pin`` themselves after the handshake.
    """
    _check_pin_format(pin)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.derp_pin = pin  # type: ignore[attr-defined]
    ctx.sslobject_class = _PinnedSSLObject
    ctx.sslsocket_class = _PinnedSSLSocket
    return ctx


def check_pin(ssl_object: Any, pin: str, *, now: datetime | None = None) -> None:
    """Raise CertPinError unless the peer's chain holds exactly one non-meta certificate matching ``pin``.

    As tlsdial: certificates whose CN starts with ``derpkey`` are skipped; a second real one is refused;
    the pinned leaf must cover the dialled server_hostname (when one was given) and be within its
    validity period.
    """
    from cryptography import x509  # noqa: PLC0415 (weight, see the top)

    _check_pin_format(pin)
    obj = getattr(ssl_object, "_ssl_object", ssl_object)
    chain = peer_chain_der(obj)
    if not chain:
        raise CertPinError("server presented no certificate")
    good = False
    for der in chain:
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise CertPinError("server presented a certificate that cannot be parsed") from None
        if _common_name(cert).startswith(META_CN_PREFIX):  # tlsdial skips these by CN prefix alone
            continue
        if good:
            raise CertPinError("server presented more than one certificate for a pinned (self-signed) node")
        got = cert_name_pin(der)
        if got != pin:
            raise CertPinError(f"server certificate {got} does not match the pin {pin}")
        host = getattr(obj, "server_hostname", None)
        if host:
            try:
                verify_hostname(cert, host)
            except CertError as e:
                raise CertPinError(f"pinned certificate does not match server name {host!r}: {e}") from None
        t = _now(now)
        if t > cert.not_valid_after_utc:
            raise CertPinError(f"pinned certificate expired {cert.not_valid_after_utc.isoformat()}")
        if t < cert.not_valid_before_utc:
            raise CertPinError(
                f"pinned certificate not valid until {cert.not_valid_before_utc.isoformat()}; is the clock right?"
            )
        good = True
    if not good:
        raise CertPinError("server presented only a meta certificate, not the pinned one")


# --- the server side: certmode manual ----------------------------------------------------------------


def cert_file_stem(hostname: str) -> str:
    """The file name stem derper uses: the hostname with everything but ``[A-Za-z0-9.-]`` removed."""
    return _UNSAFE_HOSTNAME_CHARS.sub("", hostname)


def _no_password() -> bytes:
    raise CertError("the private key is encrypted; derpd needs an unencrypted key file")


class CertStore:
    """Certificates for ``--certmode manual`` and the SSLContext built from them.

    Call :meth:`load` once at start (raises :class:`CertError`), wrap each accepted connection with
    :attr:`context` (``trio.SSLStream(stream, store.context, server_side=True)``), call :meth:`reload` on
    SIGHUP. A context obtained before a reload stays usable: its SNI callback hands new handshakes to the
    newest context, so a listener may also keep one context for its whole life.
    """

    def __init__(
        self, certdir: str | Path, hostname: str, server_public: bytes, *, bundle: str | None = None
    ) -> None:
        """``bundle``: one file name in ``certdir`` holding the private key and the full chain (what
        ``--certmode letsencrypt`` writes, so that a new pair replaces the old in one atomic rename)
        instead of derper's ``<hostname>.crt`` + ``.key``."""
        if len(server_public) != KEY_LEN:
            raise ValueError(f"server public key must be {KEY_LEN} bytes")
        hostname = hostname.strip()
        stem = cert_file_stem(hostname)
        if not stem:
            raise CertError(f"hostname {hostname!r} has no usable characters for a certificate file name")
        self.certdir = Path(certdir)
        self.hostname = hostname
        self.ip = ip_or_none(hostname)
        self.cert_path = self.certdir / (bundle or f"{stem}.crt")
        self.key_path = self.certdir / (bundle or f"{stem}.key")
        self._server_public = server_public
        self._sni_name = hostname.lower().removesuffix(".")
        self._context: ssl.SSLContext | None = None
        self._leaf_der: bytes | None = None
        self._not_after: datetime | None = None
        self._not_before: datetime | None = None
        self._generated = False

    # public state

    @property
    def context(self) -> ssl.SSLContext:
        """The newest server context; new handshakes use it (even through an older context)."""
        if self._context is None:
            raise RuntimeError("CertStore.load() has not been called")
        return self._context

    @property
    def pin(self) -> str | None:
        """The DERP map ``CertName`` to publish: the leaf's ``sha256-raw:`` pin for an IP hostname, else None.

        derper prints a CertName only for an IP hostname (where clients cannot verify by name); a DNS
        hostname's certificate is verified by name and CA, so nothing should pin it.
        """
        return self.leaf_pin if self.ip is not None else None

    @property
    def leaf_pin(self) -> str | None:
        """``sha256-raw:`` of the current leaf whatever the hostname (None before load)."""
        return None if self._leaf_der is None else cert_name_pin(self._leaf_der)

    @property
    def leaf_der(self) -> bytes | None:
        return self._leaf_der

    @property
    def not_after(self) -> datetime | None:
        return self._not_after

    @property
    def not_before(self) -> datetime | None:
        return self._not_before

    @property
    def has_certificate(self) -> bool:
        """False until a certificate is installed (``--certmode letsencrypt`` before its first order)."""
        return self._context is not None

    @property
    def generated(self) -> bool:
        """True when this process created the self-signed IP certificate."""
        return self._generated

    def derp_node(self) -> dict[str, Any]:
        """The DERPNode JSON derper logs for an IP hostname (region 900 'custom', as derper prints)."""
        node: dict[str, Any] = {"Name": "custom", "RegionID": 900, "HostName": self.hostname}
        if self.pin is not None:
            node["CertName"] = self.pin
        return node

    # loading

    def load(self) -> None:
        """Read (or, for an IP hostname with no files, create) the certificate and build the context."""
        if self.ip is not None:
            self._complete_self_signed()
        context, leaf = self._build(*self._read())
        self._install(context, leaf)
        log.info(
            "tls_cert_loaded",
            hostname=self.hostname,
            cert=str(self.cert_path),
            subject=leaf.subject.rfc4514_string(),
            not_after=leaf.not_valid_after_utc.isoformat(),
            pin=self.leaf_pin,
            generated=self._generated or None,
        )
        self._warn_validity(leaf)
        if self.ip is not None:
            log.info(
                "tls_ip_cert",
                hostname=self.hostname,
                cert_name=self.pin,
                derp_node=json.dumps(self.derp_node(), separators=(",", ":")),
            )

    def install_files(self) -> x509.Certificate:
        """Read the files, check them (hostname, key, validity now) and serve them to new handshakes.

        Raises CertError and keeps the current certificate if anything is wrong. Returns the leaf.
        """
        context, leaf = self._build(*self._read())
        now = datetime.now(UTC)
        if now > leaf.not_valid_after_utc:
            raise CertError(f"certificate expired at {leaf.not_valid_after_utc.isoformat()}")
        if now + NOT_BEFORE_SKEW < leaf.not_valid_before_utc:
            raise CertError(f"certificate is not valid before {leaf.not_valid_before_utc.isoformat()}")
        self._install(context, leaf)
        return leaf

    def reload(self) -> bool:
        """Re-read the files for new handshakes; on any problem keep the current context and log why."""
        old_pin = self.leaf_pin
        try:
            leaf = self.install_files()
        except CertError as e:
            log.warning("tls_reload_failed", cert=str(self.cert_path), error=str(e), kept=self.leaf_pin)
            return False
        log.info(
            "tls_reloaded",
            cert=str(self.cert_path),
            subject=leaf.subject.rfc4514_string(),
            not_after=leaf.not_valid_after_utc.isoformat(),
            pin=self.leaf_pin,
            changed=self.leaf_pin != old_pin,
        )
        return True

    # internals

    def _install(self, context: ssl.SSLContext, leaf: x509.Certificate) -> None:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 (weight, see the top)

        self._context = context
        self._leaf_der = leaf.public_bytes(serialization.Encoding.DER)
        self._not_after = leaf.not_valid_after_utc
        self._not_before = leaf.not_valid_before_utc

    def _warn_validity(self, leaf: x509.Certificate) -> None:
        now = datetime.now(UTC)
        if now > leaf.not_valid_after_utc:
            log.warning("tls_cert_expired", cert=str(self.cert_path), not_after=leaf.not_valid_after_utc.isoformat())
        elif now < leaf.not_valid_before_utc:
            log.warning(
                "tls_cert_not_yet_valid", cert=str(self.cert_path), not_before=leaf.not_valid_before_utc.isoformat()
            )

    def _complete_self_signed(self) -> None:
        """For an IP hostname, create what is missing of the self-signed pair.

        Both missing (or empty): a new pair, the key written first, each file atomically
        (``derpd.base.files``), so a crash leaves nothing, the key alone, or both. The key alone (that
        crash, or an operator's key): a certificate is made for it. A certificate without its key is
        left for ``_read`` to refuse: nothing derpd writes can leave that state. An empty file (an
        interrupted write by an older version) counts as missing and is replaced, with a warning.
        """
        empty = [p for p in (self.key_path, self.cert_path) if is_empty_file(p)]
        have_key = self.key_path.exists() and self.key_path not in empty
        have_cert = self.cert_path.exists() and self.cert_path not in empty
        if have_cert:
            return
        for p in empty:
            log.warning("tls_file_empty_replaced", path=str(p), why="a 0-byte file (an interrupted write)")
        key = None
        if have_key:
            key_pem = self._read_file(self.key_path)
            key = self._load_issuer_key(key_pem)
        cert_pem, new_key_pem = self_signed_ip_certificate(str(self.ip), key=key)
        try:
            self.certdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not have_key:
                write_atomic(self.key_path, new_key_pem, 0o600, replace=self.key_path in empty)
            write_atomic(self.cert_path, cert_pem, 0o644, replace=self.cert_path in empty)
        except OSError as e:
            raise CertError(f"cannot store a self-signed certificate in {self.certdir}: {one_line(str(e))}") from None
        self._generated = True
        if have_key:
            log.warning(
                "tls_cert_generated_for_existing_key",
                hostname=self.hostname,
                cert=str(self.cert_path),
                key=str(self.key_path),
                why="the key had no certificate (an interrupted first start?); the CertName pin is new",
            )
        else:
            log.info("tls_cert_generated", hostname=self.hostname, cert=str(self.cert_path), key=str(self.key_path))

    def _load_issuer_key(self, key_pem: bytes) -> CertificateIssuerPrivateKeyTypes:
        from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415 (weight, see the top)
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise CertError(f"{self.key_path}: not a usable private key: {one_line(str(e))}") from None
        if not _is_issuer_key(key):
            raise CertError(f"{self.key_path}: this kind of key cannot sign a certificate")
        return key

    def _read_file(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as e:
            raise CertError(f"cannot read {path}: {one_line(str(e))}") from None

    def _read(self) -> tuple[bytes, bytes]:
        missing = [p for p in (self.cert_path, self.key_path) if not p.exists()]
        if len(missing) == 2:
            raise CertError(f"no certificate for {self.hostname!r}: expected {self.cert_path} and {self.key_path}")
        if missing:
            hint = "; remove the other file to have a self-signed certificate generated" if self.ip else ""
            raise CertError(f"{missing[0]} is missing (expected {self.cert_path} and {self.key_path}){hint}")
        try:
            return self.cert_path.read_bytes(), self.key_path.read_bytes()
        except OSError as e:
            raise CertError(f"cannot read certificate files: {one_line(str(e))}") from None

    def check_pair(self, cert_pem: bytes, key_pem: bytes) -> list[x509.Certificate]:
        """The chain in ``cert_pem`` if its first certificate belongs to the key in ``key_pem`` and covers
        the hostname; CertError (naming the files) otherwise. Nothing is read from disk or installed."""
        from cryptography import x509  # noqa: PLC0415 (weight, see the top)
        from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        try:
            chain = x509.load_pem_x509_certificates(cert_pem)
        except ValueError:
            raise CertError(f"{self.cert_path} holds no readable PEM certificate") from None
        leaf = chain[0]
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            raise CertError(f"{self.key_path} is encrypted; derpd needs an unencrypted private key") from None
        except (ValueError, UnsupportedAlgorithm):
            raise CertError(f"{self.key_path} holds no readable PEM private key") from None
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
            raise CertError(f"private key {self.key_path} does not belong to the first certificate in {self.cert_path}")
        try:
            verify_hostname(leaf, self.hostname)
        except CertError as e:
            raise CertError(f"{self.cert_path}: {e}") from None
        return chain

    def _build(self, cert_pem: bytes, key_pem: bytes) -> tuple[ssl.SSLContext, x509.Certificate]:
        from cryptography import x509  # noqa: PLC0415 (weight, see the top)
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        chain = self.check_pair(cert_pem, key_pem)
        leaf = chain[0]

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(ALPN_PROTOCOLS)
        # Tailscale clients never resume; a full handshake every time means the meta cert always arrives.
        ctx.num_tickets = 0
        ctx.sni_callback = self._sni_callback
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        meta = x509.load_der_x509_certificate(meta_certificate(self._server_public))
        pem += meta.public_bytes(serialization.Encoding.PEM)  # last, after the real chain
        with tempfile.TemporaryDirectory(prefix="derpd-tls-") as tmp:  # mode 0700
            chain_file = Path(tmp) / "chain.pem"
            chain_file.write_bytes(pem)
            try:
                ctx.load_cert_chain(chain_file, self.key_path, password=_no_password)
            except CertError:
                raise
            except (ssl.SSLError, OSError) as e:
                raise CertError(
                    f"OpenSSL refused {self.cert_path} with {self.key_path} (changed while loading?): "
                    f"{one_line(str(e))}"
                ) from None
        return ctx, leaf

    def _sni_callback(self, ssl_object: Any, server_name: str | None, ctx: ssl.SSLContext) -> int | None:
        """Refuse a DNS hostname's handshake with another SNI; hand stale contexts' handshakes to the newest.

        Must never raise: an exception here is only printed by Python and fails the handshake anyway.
        """
        try:
            if self.ip is None and (server_name or "").lower().removesuffix(".") != self._sni_name:
                log.debug("tls_sni_refused", sni=server_name, hostname=self.hostname)
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            current = self._context
            if current is not None and current is not ctx:
                ssl_object.context = current
            return None
        except Exception as e:
            log.warning("tls_sni_callback_failed", error=repr(e))
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR


async def follow_certificate(store: CertStore, interval: float = 2.0) -> None:
    """``--workers``: serve the certificate the supervisor's manager writes, as soon as it changes.

    The file is replaced by an atomic rename, so a new inode (or size, or mtime) means a new whole file;
    ``CertStore.reload`` keeps the current certificate if the new one is unusable. Polling a stat every
    ``interval`` seconds needs no signal that could arrive before a worker is listening for it.
    """

    def identity() -> tuple[int, int, int] | None:
        try:
            st = store.cert_path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    seen = identity() if store.has_certificate else None
    while True:
        await trio.sleep(interval)
        now = identity()
        if now is not None and now != seen:
            seen = now
            store.reload()
