"""The answers an ACME CA's validation asks for while an order is pending (``--certmode letsencrypt``).

The certificate manager (``derpd.ops.acme``) puts an answer here before it tells the CA to validate,
and takes it away when the order ends. Two listeners read it:

* HTTP-01 (RFC 8555 §8.3): ``GET /.well-known/acme-challenge/<token>`` on the port-80 listener (and
  the main one) answers the key authorization (``derpd.server.front``);
* TLS-ALPN-01 (RFC 8737): a ClientHello on the TLS listener that offers ALPN ``acme-tls/1`` is
  answered with the challenge certificate for its SNI (``derpd.server.node``). For an IP identifier
  the CA sends the address's reverse-DNS name as SNI (RFC 8738 §6).

Only the CA's validation connections see any of this: a DERP client never offers ``acme-tls/1`` and
never asks for ``/.well-known/acme-challenge/``, so validation cannot disturb clients on the same ports.
"""

from __future__ import annotations

import ipaddress
import re
import ssl

from derpd.net.tls import acme_tls_alpn_context

__all__ = ["ChallengeBook", "tls_alpn_server_name"]

TOKEN_RE = re.compile(rb"[A-Za-z0-9_-]{1,256}")  # base64url (RFC 8555 §8.1); anything else is never ours
HTTP01_PREFIX = b"/.well-known/acme-challenge/"


def tls_alpn_server_name(identifier: str) -> str:
    """The SNI a CA sends when validating ``identifier`` with TLS-ALPN-01: the DNS name itself, or an
    IP address's reverse-DNS name (``1.0.0.127.in-addr.arpa``), lower-case, without a final dot."""
    try:
        return ipaddress.ip_address(identifier).reverse_pointer.lower()
    except ValueError:
        return identifier.lower().removesuffix(".")


class ChallengeBook:
    """The pending challenges' answers; what nobody asked for is never answered."""

    def __init__(self) -> None:
        self._http01: dict[bytes, bytes] = {}
        self._tls_alpn01: dict[str, ssl.SSLContext] = {}
        self.http01_answered = 0
        self.tls_alpn01_answered = 0

    @property
    def pending(self) -> bool:
        return bool(self._http01 or self._tls_alpn01)

    def add_http01(self, token: str, key_authorization: str) -> None:
        self._http01[token.encode("ascii")] = key_authorization.encode("ascii")

    def add_tls_alpn01(self, identifier: str, key_authorization: str) -> None:
        self._tls_alpn01[tls_alpn_server_name(identifier)] = acme_tls_alpn_context(identifier, key_authorization)

    def clear(self) -> None:
        self._http01.clear()
        self._tls_alpn01.clear()

    def http01(self, path: bytes) -> bytes | None:
        """The key authorization for a request path ``/.well-known/acme-challenge/<token>``, or None."""
        if not path.startswith(HTTP01_PREFIX):
            return None
        token = path[len(HTTP01_PREFIX) :]
        if not TOKEN_RE.fullmatch(token):
            return None
        answer = self._http01.get(token)
        if answer is not None:
            self.http01_answered += 1
        return answer

    def tls_alpn01(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context that answers a TLS-ALPN-01 validation for this SNI, or None.

        Without SNI (a CA that sends none for an IP address) the one pending IP challenge is taken.
        """
        if server_name is None:
            ips = [ctx for name, ctx in self._tls_alpn01.items() if name.endswith((".in-addr.arpa", ".ip6.arpa"))]
            ctx = ips[0] if len(ips) == 1 else None
        else:
            ctx = self._tls_alpn01.get(server_name.lower().removesuffix("."))
        if ctx is not None:
            self.tls_alpn01_answered += 1
        return ctx
