"""An ACME (RFC 8555) client for ``--certmode letsencrypt``, on the ``acme`` library (certbot's).

The library is the field's standard, well kept and typed; it speaks JWS, nonces, accounts, orders,
authorizations, External Account Binding, IP identifiers (RFC 8738) and Renewal Information
(RFC 9773) correctly. It is blocking (``requests``), so every step here is one call made in a worker
thread by :func:`run_step`, which the caller's deadline bounds; a step the deadline abandons finishes
on its own within its HTTP timeouts and its result is thrown away, and the session it used is never
used again.

What this module adds is what a relay needs around it: each failure becomes one :class:`AcmeError`
with a short ``reason`` (a metric label), a one-line ``detail`` for the log and, when the CA sent one,
its ``Retry-After``. The loop that decides when to order lives in ``derpd.ops.acme``; the answers to
challenges are served by ``derpd.server``.
"""

from __future__ import annotations

import datetime
import email.utils
import ipaddress
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import requests
import trio
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC

from derpd import __version__
from derpd.base.text import one_line

__all__ = [
    "LETSENCRYPT",
    "LETSENCRYPT_STAGING",
    "REASONS",
    "TLSALPN01",
    "AcmeError",
    "AcmeSession",
    "AcmeSettings",
    "Challenge",
    "Order",
    "deadline",
    "directory_url",
    "new_private_key_pem",
    "run_step",
]

LETSENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
DIRECTORY_ALIASES = {"letsencrypt": LETSENCRYPT, "production": LETSENCRYPT, "staging": LETSENCRYPT_STAGING}
HTTP_TIMEOUT = 10  # seconds, each HTTP request to the CA (connect, and each read)
CHALLENGE_TYPES = ("tls-alpn-01", "http-01")

# Why an attempt failed: the label of derpd_acme_failures_total and the log's reason=.
REASONS = (
    "unreachable",  # no connection to the CA (refused, DNS, TLS to the CA failed)
    "timeout",  # the CA did not answer in time
    "rate_limited",  # urn:ietf:params:acme:error:rateLimited (Retry-After honoured)
    "bad_nonce",  # badNonce again after the library's one retry
    "challenge_failed",  # the CA could not validate (our port, DNS, firewall)
    "account",  # the account was refused (EAB required or wrong, terms, contact)
    "ca_error",  # any other error the CA answered
    "bad_response",  # an answer that is not what RFC 8555 says (bad JSON, missing fields)
    "storage",  # the issued certificate could not be written to --certdir (disk full, permissions)
)

T = TypeVar("T")


class AcmeError(Exception):
    """One failed ACME step: ``reason`` (one of REASONS), ``detail`` (one line), ``retry_after`` seconds."""

    def __init__(self, reason: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


@dataclass(frozen=True)
class AcmeSettings:
    directory: str = LETSENCRYPT
    email: str = ""
    eab_kid: str = ""
    eab_key: str = field(default="", repr=False)  # base64url HMAC key; a secret: never logged or shown
    ca_file: str | None = None  # trust for the CA's own HTTPS (private CAs, tests)


def directory_url(value: str) -> str:
    """``--acme-directory``: a URL, or ``letsencrypt``/``staging`` for Let's Encrypt's two."""
    value = value.strip()
    return DIRECTORY_ALIASES.get(value.lower(), value)


def new_private_key_pem() -> bytes:
    """A new ECDSA P-256 key, PKCS#8 PEM (for the account and for each certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pkcs8 = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())


@dataclass
class Challenge:
    """One challenge to answer: put ``key_authorization`` where ``kind`` says, then :meth:`AcmeSession.answer`."""

    kind: str  # "tls-alpn-01" or "http-01"
    identifier: str  # the DNS name or IP address being validated
    token: str  # base64url; the HTTP-01 path's last segment
    key_authorization: str
    body: messages.ChallengeBody


@dataclass
class Order:
    resource: messages.OrderResource
    challenges: list[Challenge]  # empty when every authorization was already valid (reused)
    offered: set[str]  # the challenge types the CA offered


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The answer to a tls-alpn-01 challenge (RFC 8737): the key authorization, as for HTTP-01."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """tls-alpn-01 (RFC 8737). The library dropped its own type in acme 4.0 along with its
    pyOpenSSL certificate code; the challenge object is only a token, so it is declared here and the
    certificate is made by ``derpd.net.tls.acme_tls_alpn_certificate``. Registering it makes the
    library parse the CA's tls-alpn-01 challenges into this class instead of UnrecognizedChallenge.
    """

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: JWK, **kwargs: Any) -> str:
        return self.key_authorization(account_key)


class _Network(client.ClientNetwork):
    """The library's HTTP layer, remembering the last response's Retry-After (for rateLimited)."""

    last_retry_after: str | None = None

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        self.last_retry_after = response.headers.get("Retry-After")
        return response


def _retry_after_seconds(value: str | None, now: datetime.datetime | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(min(int(value), 10**9))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    now = now or datetime.datetime.now(datetime.UTC)
    return max(0.0, (when - now).total_seconds())


class AcmeSession:
    """One conversation with the CA: its directory, our account, one order at a time.

    Blocking: call each method through :func:`run_step`. Not shared between threads: after a step
    fails or is abandoned, make a new session.
    """

    def __init__(self, settings: AcmeSettings, account_key_pem: bytes) -> None:
        self.settings = settings
        key = serialization.load_pem_private_key(account_key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AcmeError("account", "the account key is not an ECDSA key")
        self.account_key = JWKEC(key=key)
        self.account_uri: str | None = None
        verify: Any = settings.ca_file or True  # requests takes a CA bundle path here
        self.net = _Network(
            key=self.account_key,
            alg=ES256,
            verify_ssl=verify,
            user_agent=f"derpd/{__version__} acme-python",
            timeout=HTTP_TIMEOUT,
        )
        self._client: client.ClientV2 | None = None

    @property
    def client(self) -> client.ClientV2:
        if self._client is None:
            raise RuntimeError("AcmeSession.connect() has not run")
        return self._client

    # --- steps (blocking) ---------------------------------------------------------------------

    def open_directory(self) -> None:
        """Read the CA's directory (all a renewal-information query needs)."""
        directory = client.ClientV2.get_directory(self.settings.directory, self.net)
        self._client = client.ClientV2(directory, self.net)

    def connect(self) -> str:
        """Read the directory and register (or find) the account; returns the account URL."""
        self.open_directory()
        directory = self.client.directory
        eab: dict[str, Any] | None = None
        if self.settings.eab_kid:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=self.account_key.public_key(),
                kid=self.settings.eab_kid,
                hmac_key=self.settings.eab_key,
                directory=directory,
            )
        elif self.client.external_account_required():
            raise AcmeError(
                "account", "the CA requires External Account Binding: set --acme-eab-kid and --acme-eab-key"
            )
        registration = messages.NewRegistration.from_data(
            email=self.settings.email or None, terms_of_service_agreed=True, external_account_binding=eab
        )
        try:
            regr = self.client.new_account(registration)
            uri = regr.uri
        except errors.ConflictError as e:  # the key already has an account: that one is ours
            uri = e.location
            self.net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
        self.account_uri = str(uri)
        return self.account_uri

    def new_order(self, identifier: str, cert_key_pem: bytes) -> Order:
        """Order a certificate for one DNS name or IP address; the challenges it needs answered."""
        ip = _ip(identifier)
        if ip is not None:
            csr = crypto_util.make_csr(cert_key_pem, ipaddrs=[ip])
        else:
            csr = crypto_util.make_csr(cert_key_pem, domains=[identifier])
        orderr = self.client.new_order(csr)
        found: list[Challenge] = []
        offered: set[str] = set()
        for authzr in orderr.authorizations:
            body = authzr.body
            offered.update(str(c.chall.typ) for c in body.challenges)
            if body.status == messages.STATUS_VALID:
                continue  # reused: validated recently, nothing to answer
            for challb in body.challenges:
                chall = challb.chall
                if isinstance(chall, challenges.HTTP01 | TLSALPN01):
                    found.append(
                        Challenge(
                            kind=str(chall.typ),
                            identifier=str(body.identifier.value),
                            token=chall.encode("token"),
                            key_authorization=chall.key_authorization(self.account_key),
                            body=challb,
                        )
                    )
        return Order(orderr, found, offered)

    def answer(self, challenge: Challenge) -> None:
        """Tell the CA to validate now (the answer must already be served)."""
        chall = challenge.body.chall
        assert isinstance(chall, challenges.KeyAuthorizationChallenge)
        self.client.answer_challenge(challenge.body, chall.response(self.account_key))

    def finish(self, order: Order, seconds: float) -> str:
        """Wait for validation, finalize, download: the full chain PEM (leaf first)."""
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=seconds)
        done = self.client.poll_and_finalize(order.resource, deadline)
        if not done.fullchain_pem:
            raise AcmeError("bad_response", "the order finished without a certificate")
        return str(done.fullchain_pem)

    def renewal_time(self, cert_pem: bytes) -> tuple[datetime.datetime | None, float]:
        """ARI (RFC 9773): when the CA suggests renewing (None when it offers no renewal info), and
        seconds until it should be asked again."""
        when, next_check = self.client.renewal_time(cert_pem)
        recheck = max(0.0, (next_check - datetime.datetime.now()).total_seconds())
        if when is not None and when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return when, recheck


def _ip(identifier: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(identifier)
    except ValueError:
        return None


# --- running a step, and what its failure means ---------------------------------------------------


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """The caller's deadline for one or more steps: trio.fail_after, read as AcmeError("timeout")."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise AcmeError("timeout", f"no answer from the CA within {seconds:g} s") from None


async def run_step(session: AcmeSession, step: Callable[..., T], *args: Any) -> T:
    """Run one blocking step in a worker thread; AcmeError on any failure.

    The caller's cancel scope (:func:`deadline`) bounds it: on cancellation the thread is abandoned
    and finishes by itself within the HTTP timeouts; its session must not be used again.
    """
    try:
        return await trio.to_thread.run_sync(partial(step, *args), abandon_on_cancel=True)
    except AcmeError:
        raise
    except Exception as e:  # whatever the library or the CA did: one classified line, never a traceback
        try:
            failure = classify(e, session.net.last_retry_after)
        except Exception:  # a library object too broken even to describe
            failure = AcmeError("bad_response", type(e).__name__)
        raise failure from None


def classify(exc: BaseException, retry_after: str | None = None) -> AcmeError:
    """The AcmeError that says what ``exc`` (from the acme library, requests or the CA) means."""
    if isinstance(exc, messages.Error):
        code = exc.code or ""
        detail = _detail(f"{code or exc.typ}: {exc.detail or exc.title or ''}")
        if code == "rateLimited":
            return AcmeError("rate_limited", detail, _retry_after_seconds(retry_after))
        if code == "badNonce":
            return AcmeError("bad_nonce", detail)
        if code in ("externalAccountRequired", "accountDoesNotExist", "invalidContact", "unsupportedContact"):
            return AcmeError("account", detail)
        if code in ("connection", "dns", "tls", "incorrectResponse", "unauthorized", "caa", "rejectedIdentifier"):
            return AcmeError("challenge_failed", detail)
        return AcmeError("ca_error", detail, _retry_after_seconds(retry_after))
    if isinstance(exc, errors.ValidationError):
        problems = [
            f"{authzr.body.identifier.value}: {c.chall.typ}: {c.error.code or ''} {c.error.detail or ''}"
            for authzr in exc.failed_authzrs
            for c in authzr.body.challenges
            if c.error is not None
        ]
        return AcmeError("challenge_failed", _detail("; ".join(problems) or "validation failed"))
    if isinstance(exc, errors.TimeoutError):
        return AcmeError("timeout", "the CA did not finish validating in time")
    if isinstance(exc, errors.IssuanceError):
        return AcmeError("ca_error", _detail(f"the order failed: {exc.error.detail or exc.error.code}"))
    if isinstance(exc, requests.exceptions.InvalidJSONError | ValueError) and not isinstance(
        exc, requests.exceptions.ConnectionError
    ):  # requests' JSONDecodeError is also a RequestException (and an OSError): a body that is not JSON
        return AcmeError("bad_response", _detail(f"the CA's answer is not valid JSON: {_text(exc)}"))
    if isinstance(exc, requests.exceptions.Timeout):
        return AcmeError("timeout", _detail(f"no answer from the CA within {HTTP_TIMEOUT} s ({type(exc).__name__})"))
    if isinstance(exc, requests.exceptions.SSLError):
        return AcmeError("unreachable", _detail(f"TLS to the CA failed: {_root_cause(exc)}"))
    if isinstance(exc, requests.exceptions.ConnectionError):
        return AcmeError("unreachable", _detail(f"cannot reach the CA: {_root_cause(exc)}"))
    if isinstance(exc, errors.ClientError) and exc.args and isinstance(exc.args[0], requests.Response):
        response = exc.args[0]
        return AcmeError(
            "ca_error",
            f"HTTP {response.status_code} without an ACME problem document",
            _retry_after_seconds(response.headers.get("Retry-After")),
        )
    if isinstance(exc, requests.exceptions.RequestException):
        return AcmeError("unreachable", _detail(_text(exc)))
    # JSON that does not decode, fields missing or of the wrong type, nonce headers absent...
    return AcmeError("bad_response", _detail(f"{type(exc).__name__}: {_text(exc)}"))


def _root_cause(exc: BaseException) -> str:
    seen = exc
    while seen.__context__ is not None and seen.__context__ is not seen:
        seen = seen.__context__
    return _text(seen) or type(seen).__name__


def _text(exc: BaseException) -> str:
    """str(exc), which some library exceptions cannot always give (MissingNonce without a request)."""
    try:
        return str(exc)
    except Exception:
        return type(exc).__name__


def _detail(text: str) -> str:
    """One line of at most 300 characters (the logger escapes it)."""
    text = one_line(text)
    return text if len(text) <= 300 else text[:300] + "…"

