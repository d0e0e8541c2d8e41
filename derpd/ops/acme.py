"""``--certmode letsencrypt``: get a certificate from an ACME CA, keep it renewed, serve it.

One task, :meth:`CertManager.run`, for the life of the node:

1. At start (:meth:`CertManager.prepare`, before anything listens) the account key is read or created
   and a cached certificate, if still valid for the hostname, is served at once: a restart orders
   nothing.
2. With no certificate it orders one now; with one, it sleeps until renewal is due: two thirds into
   the certificate's lifetime, or inside the window the CA suggests through ACME Renewal Information
   (RFC 9773) when the directory offers it.
3. An order answers TLS-ALPN-01 on the TLS listener (always there) or HTTP-01 on the port-80
   listener (``--acme-challenge auto`` tries TLS-ALPN-01 first, then HTTP-01 when that listener
   exists). The answers live in a ``ChallengeBook`` only while the CA validates.
4. The new key and chain are written as one file (``<certdir>/<hostname>.pem``, mode 0600, atomic)
   and swapped into the listener's TLS context as SIGHUP does: established connections keep theirs.
5. A failure is one ``acme_failed`` line and one ``derpd_acme_failures_total{reason}`` increment; the
   next try follows exponential back-off with ±20 % jitter (a rateLimited answer's Retry-After is
   honoured), and the current certificate keeps serving meanwhile.

Every blocking library call runs in a worker thread under a deadline (``derpd.net.acme.run_step``).

With ``--workers N`` the supervisor runs the manager; the ``ChallengeBook`` then keeps its answers as
files too, and each worker runs ``derpd.net.tls.follow_certificate`` to serve what the manager writes.

Only ``--certmode letsencrypt`` imports this module (``derpd.config`` does, when it is asked for): it
loads the ``acme`` library, ``requests`` and their dependencies, about 9 MB that no other mode needs.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from derpd.base import log
from derpd.base.errors import ConfigurationError
from derpd.base.files import is_empty_file, write_atomic
from derpd.base.text import one_line
from derpd.net.acme import (
    REASONS,
    AcmeError,
    AcmeSession,
    AcmeSettings,
    Order,
    deadline,
    new_private_key_pem,
    run_step,
)
from derpd.net.tls import CertError, CertStore, cert_file_stem
from derpd.ops.keyfiles import check_private_mode
from derpd.server.challenges import ChallengeBook

__all__ = ["CHALLENGE_CHOICES", "AcmeConfig", "CertManager", "bundle_name"]

CHALLENGE_CHOICES = ("auto", "tls-alpn-01", "http-01")
STEP_TIMEOUT = 45.0  # seconds for one exchange with the CA (a few HTTP requests of HTTP_TIMEOUT each)
VALIDATION_TIMEOUT = 90.0  # seconds for the CA to validate and issue
RENEW_AT = 2 / 3  # of the lifetime, when the CA offers no renewal information
ARI_RECHECK = (60.0, 86400.0)  # bounds on how often renewal information is asked again (seconds)
BACKOFF_BASE = 2.0  # first retry after an unreachable CA, a timeout, an error answer (doubling)
BACKOFF_CHALLENGE = 60.0  # first retry after every challenge type failed (CAs limit failed validations)
BACKOFF_CAP = 3600.0
NEXT_TYPE_DELAY = 1.0  # auto mode: a failed challenge type is followed by the next type this soon
RATE_LIMIT_CAP = 7 * 86400.0  # a Retry-After beyond this is read as this
JITTER = 0.2


@dataclass(frozen=True)
class AcmeConfig:
    hostname: str  # a DNS name or an IP address (an IP certificate, RFC 8738)
    certdir: Path
    settings: AcmeSettings
    challenge: str = "auto"  # one of CHALLENGE_CHOICES
    http01: bool = True  # a port-80 listener exists to answer HTTP-01


def bundle_name(hostname: str) -> str:
    """The file in the cert dir that holds the key and the full chain: ``<hostname>.pem``."""
    return f"{cert_file_stem(hostname)}.pem"


def _account_slug(directory: str) -> str:
    """``<ca host>-<8 hex>``: one account per directory URL, readable in ``ls``."""
    host = re.sub(r"[^A-Za-z0-9.-]", "", urlsplit(directory).hostname or "ca")[:64] or "ca"
    return f"{host}-{hashlib.sha256(directory.encode()).hexdigest()[:8]}"


class CertManager:
    """Obtains and renews the certificate that ``store`` serves; answers challenges through ``book``."""

    def __init__(self, config: AcmeConfig, store: CertStore, book: ChallengeBook, *, rng: random.Random | None = None):
        self.config = config
        self.store = store
        self.book = book
        self.ready = trio.Event()  # set once a certificate is served
        self.failures = dict.fromkeys(REASONS, 0)
        self.issued = 0
        self.next_renewal: float | None = None  # Unix time of the next planned order
        self.last_error: str | None = None
        self._rng = rng or random.Random()
        slug = _account_slug(config.settings.directory)
        self.account_key_path = config.certdir / f"acme-account-{slug}.key"
        self.account_info_path = config.certdir / f"acme-account-{slug}.json"
        self._account_key: bytes | None = None
        self._account_uri: str | None = None
        self._consecutive = 0
        self._kind_index = 0
        self._kinds_failed: set[str] = set()
        self._ari_due: datetime | None = None
        self._ari_check_at = 0.0  # trio clock
        self._scheduled: tuple[datetime, str] | None = None

    # --- start --------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Before anything listens: the cert dir, the account key, a cached certificate if usable.

        Raises ConfigurationError for what the operator must fix (a cert dir or key file derpd cannot
        write or read)."""
        certdir = self.config.certdir
        try:
            certdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigurationError(f"--certdir {certdir}: {one_line(e.strerror or e)}") from None
        self._account_key = self._load_or_create_account_key()
        try:
            info = json.loads(self.account_info_path.read_text())
            if isinstance(info, dict) and info.get("directory") == self.config.settings.directory:
                uri = info.get("uri")
                self._account_uri = uri if isinstance(uri, str) else None
        except (OSError, ValueError):
            pass
        self.load_cached()

    def _load_or_create_account_key(self) -> bytes:
        path = self.account_key_path
        try:
            if path.exists() and not is_empty_file(path):
                check_private_mode(path, path.stat())  # whoever reads it can act as the account
                data = path.read_bytes()
                try:
                    serialization.load_pem_private_key(data, password=None)
                except (ValueError, TypeError) as e:
                    raise ConfigurationError(f"{path}: not a usable ACME account key: {one_line(e)}") from None
                return data
            data = new_private_key_pem()
            write_atomic(path, data, 0o600, replace=path.exists())
        except OSError as e:
            raise ConfigurationError(f"ACME account key {path}: {one_line(e.strerror or e)}") from None
        log.info("acme_account_key_created", path=str(path))
        return data

    def load_cached(self) -> None:
        """Serve the certificate in the cert dir if it is usable (logged either way)."""
        path = self.store.cert_path
        if not path.exists():
            log.info("acme_no_cached_certificate", hostname=self.config.hostname, path=str(path))
            return
        try:
            leaf = self.store.install_files()
        except CertError as e:
            log.warning("acme_cached_certificate_unusable", path=str(path), error=str(e), action="ordering a new one")
            return
        log.info(
            "acme_certificate_cached",
            hostname=self.config.hostname,
            path=str(path),
            not_after=leaf.not_valid_after_utc.isoformat(),
        )
        self.ready.set()

    # --- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Order, renew and retry for ever (cancel to stop)."""
        while True:
            try:
                wait = await self._until_due()
                if wait > 0:
                    await trio.sleep(wait)
                    continue
                await self._obtain()
            except AcmeError as e:
                await trio.sleep(self._failed(e))
            except Exception as e:  # a bug here must not take the relay down with it
                log.exception("acme_internal_error", error=repr(e))
                await trio.sleep(self._failed(AcmeError("bad_response", f"internal error: {type(e).__name__}")))

    async def _until_due(self) -> float:
        """Seconds until the next order is due (0 = now). Asks the CA's renewal information when due."""
        not_before, not_after = self.store.not_before, self.store.not_after
        if not self.store.has_certificate or not_before is None or not_after is None:
            self.next_renewal = datetime.now(UTC).timestamp()
            return 0.0
        lifetime = not_after - not_before
        due, why = not_before + lifetime * RENEW_AT, "lifetime"
        if trio.current_time() >= self._ari_check_at:
            await self._check_renewal_info()
        if self._ari_due is not None:
            due, why = min(self._ari_due, not_after - lifetime / 10), "ari"
        if self._scheduled != (due, why):
            self._scheduled = (due, why)
            log.info("acme_renewal_scheduled", hostname=self.config.hostname, at=due.isoformat(), why=why)
        self.next_renewal = due.timestamp()
        now = datetime.now(UTC)
        wait = (due - now).total_seconds()
        if wait <= 0:
            return 0.0
        return min(wait, max(0.0, self._ari_check_at - trio.current_time()) + 0.01)

    async def _check_renewal_info(self) -> None:
        """RFC 9773: the CA's suggested renewal window for the current certificate, if it has one."""
        cert_pem = self._served_chain_pem()
        self._ari_check_at = trio.current_time() + ARI_RECHECK[1]
        if cert_pem is None or self._account_key is None:
            return
        session = AcmeSession(self.config.settings, self._account_key)
        try:
            with deadline(STEP_TIMEOUT):
                await run_step(session, session.open_directory)
                when, recheck = await run_step(session, session.renewal_time, cert_pem)
        except AcmeError as e:
            log.debug("acme_renewal_info_unavailable", reason=e.reason, error=e.detail)
            self._ari_check_at = trio.current_time() + ARI_RECHECK[0] * 10
            return
        self._ari_due = when
        self._ari_check_at = trio.current_time() + min(max(recheck, ARI_RECHECK[0]), ARI_RECHECK[1])

    def _served_chain_pem(self) -> bytes | None:
        try:
            data = self.store.cert_path.read_bytes()
        except OSError:
            return None
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:  # replaced by something unreadable since it was loaded: no renewal info then
            return None
        return certs[0].public_bytes(serialization.Encoding.PEM)

    def _kinds(self) -> list[str]:
        if self.config.challenge != "auto":
            return [self.config.challenge]
        return ["tls-alpn-01", "http-01"] if self.config.http01 else ["tls-alpn-01"]

    async def _obtain(self) -> None:
        """One order, start to finish; AcmeError if any step fails."""
        assert self._account_key is not None, "prepare() first"
        hostname = self.config.hostname
        kinds = self._kinds()
        kind = kinds[self._kind_index % len(kinds)]
        started = trio.current_time()
        session = AcmeSession(self.config.settings, self._account_key)
        with deadline(STEP_TIMEOUT):
            uri = await run_step(session, session.connect)
        self._remember_account(uri)
        cert_key = new_private_key_pem()
        with deadline(STEP_TIMEOUT):
            order: Order = await run_step(session, session.new_order, hostname, cert_key)
        chosen = [c for c in order.challenges if c.kind == kind]
        if order.challenges and not chosen:
            offered = ",".join(sorted(order.offered)) or "none"
            self._kind_index += 1
            raise AcmeError("ca_error", f"the CA offers {offered} for {hostname}, not {kind}")
        log.info("acme_order_started", hostname=hostname, challenge=kind if chosen else "none (already valid)")
        try:
            for c in chosen:
                if c.kind == "http-01":
                    self.book.add_http01(c.token, c.key_authorization)
                else:
                    self.book.add_tls_alpn01(c.identifier, c.key_authorization)
            for c in chosen:
                with deadline(STEP_TIMEOUT):
                    await run_step(session, session.answer, c)
            try:
                with deadline(VALIDATION_TIMEOUT + STEP_TIMEOUT):
                    chain = await run_step(session, session.finish, order, VALIDATION_TIMEOUT)
            except AcmeError as e:
                if e.reason == "challenge_failed":
                    self._kinds_failed.add(kind)
                    self._kind_index += 1
                raise
        finally:
            self.book.clear()
        leaf = self._store_bundle(cert_key, chain.encode())
        self.issued += 1
        self._consecutive = 0
        self._kinds_failed.clear()
        self._ari_due = None
        self._ari_check_at = 0.0
        self.last_error = None
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        self.next_renewal = (leaf.not_valid_before_utc + lifetime * RENEW_AT).timestamp()  # until ARI says more
        log.info(
            "acme_certificate_issued",
            hostname=hostname,
            challenge=kind if chosen else "reused",
            not_before=leaf.not_valid_before_utc.isoformat(),
            not_after=leaf.not_valid_after_utc.isoformat(),
            seconds=f"{trio.current_time() - started:.2f}",
        )
        self.ready.set()

    def _store_bundle(self, key_pem: bytes, chain_pem: bytes) -> x509.Certificate:
        """Check what the CA sent, write key + chain atomically, serve it."""
        try:
            chain = self.store.check_pair(chain_pem, key_pem)
        except CertError as e:
            raise AcmeError("bad_response", f"the certificate the CA sent: {e}") from None
        pem = key_pem + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        path = self.store.cert_path
        try:
            write_atomic(path, pem, 0o600, replace=True)
        except OSError as e:  # OpenSSL loads the key from this file: unsaved, it cannot be served
            why = f"cannot write {path}: {one_line(e)}; the current certificate keeps serving"
            raise AcmeError("storage", why) from None
        try:
            return self.store.install_files()
        except CertError as e:
            raise AcmeError("bad_response", f"the certificate cannot be served: {e}") from None

    def _remember_account(self, uri: str) -> None:
        if uri == self._account_uri:
            return
        self._account_uri = uri
        info = {"directory": self.config.settings.directory, "uri": uri, "created": datetime.now(UTC).isoformat()}
        try:
            write_atomic(self.account_info_path, json.dumps(info, indent=2).encode() + b"\n", 0o600, replace=True)
        except OSError as e:
            log.warning("acme_account_not_saved", path=str(self.account_info_path), error=one_line(e))
        log.info("acme_account", directory=self.config.settings.directory, uri=uri)

    def _failed(self, e: AcmeError) -> float:
        """Count and log a failure; the seconds to wait before the next try."""
        self.failures[e.reason] = self.failures.get(e.reason, 0) + 1
        self.last_error = f"{e.reason}: {e.detail}"
        kinds = self._kinds()
        if e.reason == "challenge_failed" and len(self._kinds_failed) < len(kinds):
            delay = NEXT_TYPE_DELAY  # another challenge type is left to try
        else:
            self._consecutive += 1
            self._kinds_failed.clear()
            base = BACKOFF_CHALLENGE if e.reason == "challenge_failed" else BACKOFF_BASE
            exponent = min(self._consecutive - 1, 30)
            delay = min(BACKOFF_CAP, base * 2**exponent)
            delay *= 1 + self._rng.uniform(-JITTER, JITTER)
            if e.retry_after is not None:
                delay = max(delay, min(e.retry_after, RATE_LIMIT_CAP))
        not_after = self.store.not_after
        fields: dict[str, object] = {}
        if not_after is not None:
            fields["cert_expires_in"] = f"{(not_after - datetime.now(UTC)).total_seconds():.0f}s"
        self.next_renewal = (datetime.now(UTC) + timedelta(seconds=delay)).timestamp()
        log.warning(
            "acme_failed",
            hostname=self.config.hostname,
            reason=e.reason,
            retry_in=f"{delay:.1f}s",
            error=e.detail,
            **fields,
        )
        return delay

    def status(self) -> str:
        """For systemd's STATUS= while no certificate is served yet."""
        why = f" (last error: {self.last_error})" if self.last_error else ""
        return f"waiting for a certificate for {self.config.hostname} from the ACME CA{why}"

