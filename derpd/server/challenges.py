"""The answers an ACME CA's validation asks for while an order is pending (``--certmode letsencrypt``).

The certificate manager (``derpd.ops.acme``) puts an answer here before it tells the CA to validate,
and takes it away when the order ends. Two listeners read it:

* HTTP-01 (RFC 8555 §8.3): ``GET /.well-known/acme-challenge/<token>`` on the port-80 listener (and
  the main one) answers the key authorization (``derpd.server.front``);
* TLS-ALPN-01 (RFC 8737): a ClientHello on the TLS listener that offers ALPN ``acme-tls/1`` is
  answered with the challenge certificate for its SNI (``derpd.server.node``). For an IP identifier
  the CA sends the address's reverse-DNS name as SNI (RFC 8738 §6).

With ``--workers N`` the supervisor orders and the workers answer: the book is then also kept as files
in a directory (``<certdir>/acme-challenges``), which every worker's book reads when its own memory has
no answer.

Only the CA's validation connections see any of this: a DERP client never offers ``acme-tls/1`` and
never asks for ``/.well-known/acme-challenge/``, so validation cannot disturb clients on the same ports.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from pathlib import Path

from derpd.base import log
from derpd.base.files import write_atomic
from derpd.net.tls import acme_tls_alpn_context

__all__ = ["ChallengeBook", "tls_alpn_server_name"]

TOKEN_RE = re.compile(rb"[A-Za-z0-9_-]{1,256}")  # base64url (RFC 8555 §8.1); anything else is never ours
HTTP01_PREFIX = b"/.well-known/acme-challenge/"
SNI_RE = re.compile(r"[a-z0-9.-]{1,253}")  # what may name a file here; any other SNI is never ours


def tls_alpn_server_name(identifier: str) -> str:
    """The SNI a CA sends when validating ``identifier`` with TLS-ALPN-01: the DNS name itself, or an
    IP address's reverse-DNS name (``1.0.0.127.in-addr.arpa``), lower-case, without a final dot."""
    try:
        return ipaddress.ip_address(identifier).reverse_pointer.lower()
    except ValueError:
        return identifier.lower().removesuffix(".")


class ChallengeBook:
    """The pending challenges' answers; what nobody asked for is never answered.

    ``directory``: also keep them as files there (written by the process that orders, read by every
    process that serves the ports).
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._http01: dict[bytes, bytes] = {}
        self._tls_alpn01: dict[str, ssl.SSLContext] = {}
        self._written: list[Path] = []
        self._from_files: dict[tuple[str, str], ssl.SSLContext] = {}  # (sni, file text) -> context
        self.http01_answered = 0
        self.tls_alpn01_answered = 0

    @property
    def pending(self) -> bool:
        return bool(self._http01 or self._tls_alpn01)

    def add_http01(self, token: str, key_authorization: str) -> None:
        self._http01[token.encode("ascii")] = key_authorization.encode("ascii")
        self._write(f"http-01-{token}", key_authorization)

    def add_tls_alpn01(self, identifier: str, key_authorization: str) -> None:
        sni = tls_alpn_server_name(identifier)
        self._tls_alpn01[sni] = acme_tls_alpn_context(identifier, key_authorization)
        self._write(f"tls-alpn-01-{sni}", f"{identifier}\n{key_authorization}")

    def clear(self) -> None:
        self._http01.clear()
        self._tls_alpn01.clear()
        for path in self._written:
            path.unlink(missing_ok=True)
        self._written.clear()
        self._from_files.clear()

    def http01(self, path: bytes) -> bytes | None:
        """The key authorization for a request path ``/.well-known/acme-challenge/<token>``, or None."""
        if not path.startswith(HTTP01_PREFIX):
            return None
        token = path[len(HTTP01_PREFIX) :]
        if not TOKEN_RE.fullmatch(token):
            return None
        answer = self._http01.get(token)
        if answer is None:
            text = self._read(f"http-01-{token.decode('ascii')}")
            answer = text.encode("ascii", "replace") if text is not None else None
        if answer is not None:
            self.http01_answered += 1
        return answer

    def tls_alpn01(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context that answers a TLS-ALPN-01 validation for this SNI, or None.

        Without SNI (a CA that sends none for an IP address) the one pending IP challenge is taken.
        """
        if server_name is None:
            names = [n for n in self._tls_alpn01 if n.endswith((".in-addr.arpa", ".ip6.arpa"))]
            if not names and self.directory is not None:
                names = [n for n in self._listed("tls-alpn-01-") if n.endswith((".in-addr.arpa", ".ip6.arpa"))]
            if len(names) != 1:
                return None
            server_name = names[0]
        sni = server_name.lower().removesuffix(".")
        ctx = self._tls_alpn01.get(sni)
        if ctx is None and SNI_RE.fullmatch(sni):
            ctx = self._context_from_file(sni)
        if ctx is not None:
            self.tls_alpn01_answered += 1
        return ctx

    # --- the files (--workers) ----------------------------------------------------------------

    def _write(self, name: str, text: str) -> None:
        if self.directory is None:
            return
        path = self.directory / name
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(path, text.encode("ascii"), 0o600, replace=True)
        except OSError as e:  # the workers cannot answer then: the CA's validation fails and says so
            log.warning("acme_challenge_not_written", path=str(path), error=str(e))
            return
        self._written.append(path)

    def _read(self, name: str) -> str | None:
        if self.directory is None:
            return None
        try:
            return (self.directory / name).read_text("ascii")
        except (OSError, UnicodeDecodeError):
            return None

    def _listed(self, prefix: str) -> list[str]:
        assert self.directory is not None
        try:
            return [p.name[len(prefix) :] for p in self.directory.iterdir() if p.name.startswith(prefix)]
        except OSError:
            return []

    def _context_from_file(self, sni: str) -> ssl.SSLContext | None:
        text = self._read(f"tls-alpn-01-{sni}")
        if text is None:
            return None
        ctx = self._from_files.get((sni, text))
        if ctx is None:
            identifier, _, key_authorization = text.partition("\n")
            if not key_authorization or tls_alpn_server_name(identifier) != sni:
                return None
            if len(self._from_files) > 16:  # only ever a few pending; never grow with stale entries
                self._from_files.clear()
            ctx = self._from_files[(sni, text)] = acme_tls_alpn_context(identifier, key_authorization)
        return ctx
