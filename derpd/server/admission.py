"""Client admission: may this DERP client (public key + source IP) use the relay?

A relay that admits every key is an open relay: anyone on the internet can push traffic
through it. Two mechanisms exist, and every configured one must admit a client:

* ``--allow-keys FILE``: a static allowlist of ``nodekey:<hex>`` lines, re-read on SIGHUP.
* ``--verify-client-url URL``: derper's admission webhook, which is exactly Headscale's
  ``POST /verify``. We POST ``{"NodePublic":"nodekey:<hex>","Source":"<ip>"}`` and admit only
  on HTTP 200 whose body decodes to ``{"Allow": true}``. Only transport failures (refused,
  timeout, TLS, connection closed before the response head) follow ``fail_open``; a non-200
  status or a false/malformed answer always denies.

The allowlist is consulted first, so a key it refuses never costs an HTTP request. Answers
from the URL are cached briefly per (key, source IP) so that a reconnect storm does not flood
the control plane; transport failures and non-200 statuses are never cached.

**Mesh rule.** A mesh peer (its ClientInfo carries the server's mesh key, compared in constant
time) is never checked: it is another relay of the region, not a tailnet node, so neither
the allowlist nor the control plane knows its key (tailscale#5052). ``Admission.check`` takes
``mesh_peer=True`` and admits at once so that the rule lives here; a relay may also simply
skip the call.

With nothing configured everyone is admitted (as derper without ``--verify-clients``).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import ssl
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h11
import trio

from derpd import __version__
from derpd.base import log
from derpd.base.errors import ConfigurationError
from derpd.net.httpclient import HttpClientConnection, NoResponse, describe_error, open_tcp, start_tls
from derpd.proto import gojson
from derpd.proto.keys import KEY_LEN, InvalidKeyError, NodeKey, parse_public_key, public_key_text, short_key

VERIFY_TIMEOUT = 5.0  # derper: context.WithTimeout(5s) around the whole exchange
CACHE_TTL = 30.0
CACHE_MAX_ENTRIES = 65_536
MAX_RESPONSE_BODY = 4 * 1024  # derper: io.LimitReader(res.Body, 4<<10)
MAX_RESPONSE_HEAD = 16 * 1024
MAX_CONCURRENT = 32  # webhook requests in flight at once (random keys must not flood Headscale)
# One source (an IPv4 address, an IPv6 /64) may hold at most this share of those slots, so a single
# address sending random keys cannot keep everyone else's logins from being checked.
MAX_PER_SOURCE_SHARE = 4  # max_concurrent // 4 = 8 of 32
OVERFLOW_LOG_INTERVAL = 10.0  # seconds between the sampled info lines about overflowing checks
WARN_INTERVAL = 10.0  # at most one "unreachable" warning per interval; the rest are counted

Clock = Callable[[], float]


class AdmissionError(ConfigurationError):
    """Admission is misconfigured (bad URL, unreadable or malformed allowlist); the message says why."""


@dataclass(frozen=True)
class Verdict:
    """The decision for one client, with a short phrase for the relay's log line.

    ``cached`` is True when no new HTTP request was made for this check (a cache hit, or an
    identical check already in flight was shared). ``detail`` says more where there is more
    to say (the transport error, a body problem); it never holds secrets.
    """

    allowed: bool
    reason: str
    cached: bool = False
    detail: str = ""


@dataclass
class AdmissionStats:
    """Plain counters for a metrics exporter (``derp_admission{result}`` and friends).

    Every ``check`` of a non-mesh client lands in exactly one of ``allowed``, ``denied`` or
    ``error``. ``error`` means the verify URL was unreachable; the verdict then followed
    ``fail_open`` (so with fail-open those clients were admitted).
    """

    allowed: int = 0
    denied: int = 0
    error: int = 0
    mesh_bypass: int = 0  # mesh peers admitted without a check
    cache_hits: int = 0
    cache_misses: int = 0
    coalesced: int = 0  # checks that waited for an identical request already in flight
    requests: int = 0  # HTTP requests sent to the verify URL
    reloads: int = 0
    reload_failures: int = 0
    # Checks decided by the fail-open/fail-closed policy at once because no request slot was free
    # (they also count under ``error``): every slot busy, or this source already holds its share.
    overflow_slots_full: int = 0
    overflow_source_busy: int = 0

    @property
    def results(self) -> dict[str, int]:
        return {"allowed": self.allowed, "denied": self.denied, "error": self.error}

    @property
    def overflow(self) -> dict[str, int]:
        return {"slots_full": self.overflow_slots_full, "source_busy": self.overflow_source_busy}

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.__dict__.items()}


# --- verify URL ------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class VerifyURL:
    """A parsed ``http(s)://[user:pass@]host[:port]/path?query`` admission URL.

    Its repr is ``display``: credentials and query strings (tokens) never reach a log.
    """

    scheme: str
    host: str
    port: int
    target: str  # path + query, as sent in the request line
    authorization: str | None = None  # from URL userinfo, as Go's client does

    def __repr__(self) -> str:
        return f"VerifyURL({self.display!r})"

    @classmethod
    def parse(cls, url: str) -> VerifyURL:
        try:
            parts = urllib.parse.urlsplit(url.strip())
            port = parts.port
        except ValueError as e:
            raise AdmissionError(f"verify-client-url: {e}") from None
        if parts.scheme not in ("http", "https"):
            raise AdmissionError("verify-client-url must start with http:// or https://")
        host = parts.hostname
        if not host:
            raise AdmissionError("verify-client-url has no host")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in target):
            raise AdmissionError("verify-client-url path contains spaces or control characters")
        auth = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        default = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, host, port or default, target, auth)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def display(self) -> str:
        """For logs: no credentials and no query string (either may hold a token)."""
        path, _, query = self.target.partition("?")
        return f"{self.scheme}://{self.host_header}{path}" + ("?…" if query else "")


def request_body(key: NodeKey, source_ip: str) -> bytes:
    """``tailcfg.DERPAdmitClientRequest`` exactly as Go's json.Marshal writes it (compact)."""
    return json.dumps({"NodePublic": public_key_text(key), "Source": source_ip}, separators=(",", ":")).encode()


def source_bucket(ip: str) -> str:
    """The unit of per-source fairness: an IPv4 address, or an IPv6 /64 (one host commonly holds a
    whole /64, so per-address fairness would mean nothing there)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 6:
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return ip


def normalize_ip(text: str) -> str:
    """The client IP as Go's netip.Addr prints it (IPv4-mapped IPv6 unmapped); non-IPs unchanged."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return text
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def decode_admit_response(body: bytes) -> tuple[bool, str]:
    """Decide a 200 answer as Go's ``json.NewDecoder(...).Decode(&DERPAdmitClientResponse)`` would.

    The first JSON value counts (trailing bytes are ignored, as a Decoder does); field names match
    case-insensitively and the last match wins; ``null`` leaves Allow false; any other non-bool
    Allow is a decode error; nesting and size are bounded (``derpd.proto.gojson``). Returns (allowed,
    reason) where reason is a short phrase.
    """
    try:
        doc = gojson.parse(body, max_size=MAX_RESPONSE_BODY, first_value_only=True)
    except gojson.GoJSONError:
        return False, "verify-url: malformed JSON"
    if doc is not None and not isinstance(doc, gojson.Pairs):
        return False, "verify-url: answer is not a JSON object"
    try:
        allow = gojson.fill(doc, {"Allow": bool}, "verify-url answer").get("Allow", False)
    except gojson.GoJSONError:
        return False, "verify-url: Allow is not a bool"
    return (True, "verify-url allow") if allow else (False, "verify-url deny")


# --- allowlist ------------------------------------------------------------------------------


def parse_allowlist(text: str, source: str = "allowlist") -> frozenset[bytes]:
    """Keys from ``nodekey:<hex>`` lines; blank lines and ``#`` comments (also trailing) ignored.

    Error messages name the line number but never echo the line: a private key pasted by
    mistake must not end up in a log.
    """
    keys: set[bytes] = set()
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            keys.add(parse_public_key(line))
        except InvalidKeyError:
            hint = " (this looks like a private key: remove it)" if line.startswith("privkey:") else ""
            raise AdmissionError(f"{source}: line {lineno}: expected nodekey:<64 hex digits>{hint}") from None
    return frozenset(keys)


def read_allowlist(path: str) -> frozenset[bytes]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise AdmissionError(f"cannot read allowlist {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AdmissionError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse_allowlist(text, path)


# --- the HTTP exchange --------------------------------------------------------------------------


_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError, NoResponse)


@dataclass
class _Response:
    status: int | None = None
    body: bytearray = field(default_factory=bytearray)
    body_error: str = ""


@dataclass
class _Flight:
    """An HTTP request in progress that identical concurrent checks wait for."""

    done: trio.Event = field(default_factory=trio.Event)
    outcome: tuple[Verdict, str, bool] | None = None  # None: the leader was cancelled


# --- admission ------------------------------------------------------------------------------


class Admission:
    """All configured mechanisms must admit. With none configured, everyone is admitted."""

    def __init__(
        self,
        *,
        verify_url: str | None = None,
        fail_open: bool = True,
        cache_ttl: float = CACHE_TTL,
        allow_keys_file: str | None = None,
        timeout: float = VERIFY_TIMEOUT,
        clock: Clock = trio.current_time,
        ssl_context: ssl.SSLContext | None = None,
        max_cache_entries: int = CACHE_MAX_ENTRIES,
        max_concurrent: int = MAX_CONCURRENT,
        max_per_source: int | None = None,
    ) -> None:
        if timeout <= 0:
            raise AdmissionError("verify-client-url timeout must be positive")
        if cache_ttl < 0:
            raise AdmissionError("admission cache TTL must be >= 0 (0 disables the cache)")
        if max_per_source is None:
            max_per_source = max(1, max_concurrent // MAX_PER_SOURCE_SHARE)
        if max_cache_entries < 1 or max_concurrent < 1 or max_per_source < 1:
            raise AdmissionError("admission cache size and concurrency must be >= 1")
        self.url = VerifyURL.parse(verify_url) if verify_url else None
        self.fail_open = fail_open
        self.cache_ttl = cache_ttl
        self.allow_keys_file = allow_keys_file or None
        self.timeout = timeout
        self.max_cache_entries = max_cache_entries
        self._clock = clock
        self._ssl_context = ssl_context
        if self.url is not None and self.url.scheme == "https" and ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        self.max_concurrent = max_concurrent
        self.max_per_source = max_per_source
        self._in_flight = 0  # webhook requests now running
        self._in_flight_by_source: dict[str, int] = {}
        self._overflow_log = log.Sampled("admission_verify_overflow", OVERFLOW_LOG_INTERVAL)
        self._allowed: frozenset[bytes] | None = None
        self._cache: OrderedDict[tuple[bytes, str], tuple[float, Verdict, str]] = OrderedDict()
        self._flights: dict[tuple[bytes, str], _Flight] = {}
        self._generation = 0  # bumped by reload(): answers fetched before it are not cached
        self._warned_at: float | None = None
        self._suppressed = 0
        self.stats = AdmissionStats()

    # --- configuration ---------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True when some mechanism is configured; a relay may skip ``check`` otherwise."""
        return self.url is not None or self.allow_keys_file is not None

    @property
    def allowlist_size(self) -> int | None:
        return None if self._allowed is None else len(self._allowed)

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def summary(self) -> dict[str, Any]:
        """Fields for the startup log line; no credentials."""
        return {
            "allow_keys": self.allow_keys_file,
            "allow_keys_count": self.allowlist_size,
            "verify_url": self.url.display if self.url else None,
            "fail_open": self.fail_open if self.url else None,
            "cache_ttl": f"{self.cache_ttl:g}s" if self.url else None,
        }

    def load(self) -> None:
        """Read the allowlist at start; raises AdmissionError so a bad file stops startup."""
        if self.allow_keys_file is None:
            return
        self._allowed = read_allowlist(self.allow_keys_file)
        log.info("admission_allowlist_loaded", path=self.allow_keys_file, keys=len(self._allowed))
        if not self._allowed:
            log.warning("admission_allowlist_empty", path=self.allow_keys_file, effect="every client is refused")

    def reload(self) -> bool:
        """SIGHUP: forget cached URL answers and re-read the allowlist.

        On a bad file the old allowlist stays in force, the reason is logged and False is returned.
        Clients already connected are not re-checked here.
        """
        self.stats.reloads += 1
        self._generation += 1
        self._cache.clear()
        if self.allow_keys_file is None:
            return True
        try:
            keys = read_allowlist(self.allow_keys_file)
        except AdmissionError as e:
            self.stats.reload_failures += 1
            log.warning(
                "admission_allowlist_reload_failed", path=self.allow_keys_file, error=str(e), kept=self.allowlist_size
            )
            return False
        old = self._allowed or frozenset()
        self._allowed = keys
        log.info(
            "admission_allowlist_reloaded",
            path=self.allow_keys_file,
            keys=len(keys),
            added=len(keys - old),
            removed=len(old - keys),
        )
        if not keys:
            log.warning("admission_allowlist_empty", path=self.allow_keys_file, effect="every client is refused")
        return True

    # --- the check ---------------------------------------------------------------------------

    async def check(self, key: NodeKey, source_ip: str, *, mesh_peer: bool = False) -> Verdict:
        """Decide whether ``key`` connecting from ``source_ip`` may use the relay.

        Call after the ClientInfo has been opened and before registering the client; on a deny,
        close the connection without any frame (as derper does). ``mesh_peer`` must be the result
        of the constant-time mesh-key comparison: mesh peers are admitted without a check.
        Never raises for a misbehaving verify URL.
        """
        if len(key) != KEY_LEN:
            raise ValueError(f"public key must be {KEY_LEN} bytes")
        if mesh_peer:
            self.stats.mesh_bypass += 1
            return Verdict(True, "mesh peer")
        if self.allow_keys_file is not None:
            if self._allowed is None:
                return self._count(Verdict(False, "allowlist not loaded"), "denied")
            if key not in self._allowed:
                return self._count(Verdict(False, "not in allowlist"), "denied")
            if self.url is None:
                return self._count(Verdict(True, "allowlist"), "allowed")
        if self.url is None:
            return self._count(Verdict(True, "no admission configured"), "allowed")
        verdict, result = await self._check_url(key, normalize_ip(source_ip))
        if self.allow_keys_file is not None and verdict.allowed:
            verdict = replace(verdict, reason=f"allowlist + {verdict.reason}")
        return self._count(verdict, result)

    def _count(self, verdict: Verdict, result: str) -> Verdict:
        setattr(self.stats, result, getattr(self.stats, result) + 1)
        return verdict

    async def _check_url(self, key: NodeKey, ip: str) -> tuple[Verdict, str]:
        if self.cache_ttl <= 0:
            verdict, result, _ = await self._ask(key, ip)
            return verdict, result
        ck = (key, ip)
        while True:
            hit = self._cache_get(ck)
            if hit is not None:
                self.stats.cache_hits += 1
                return replace(hit[0], cached=True), hit[1]
            flight = self._flights.get(ck)
            if flight is None:
                break
            self.stats.coalesced += 1
            await flight.done.wait()
            if flight.outcome is not None:
                return replace(flight.outcome[0], cached=True), flight.outcome[1]
            # The request's owner was cancelled before an answer: look again, maybe ask ourselves.
        self.stats.cache_misses += 1
        flight = self._flights[ck] = _Flight()
        generation = self._generation
        try:
            flight.outcome = await self._ask(key, ip)
        finally:
            del self._flights[ck]
            flight.done.set()
        verdict, result, cacheable = flight.outcome
        if cacheable and generation == self._generation:
            self._cache_put(ck, verdict, result)
        return verdict, result

    def _cache_get(self, ck: tuple[bytes, str]) -> tuple[Verdict, str] | None:
        entry = self._cache.get(ck)
        if entry is None:
            return None
        expires, verdict, result = entry
        if self._clock() >= expires:
            del self._cache[ck]
            return None
        return verdict, result

    def _cache_put(self, ck: tuple[bytes, str], verdict: Verdict, result: str) -> None:
        now = self._clock()
        cache = self._cache
        cache.pop(ck, None)
        cache[ck] = (now + self.cache_ttl, verdict, result)
        # One TTL for all entries: insertion order is expiry order, so expired ones sit in front.
        while cache:
            oldest = next(iter(cache.values()))
            if len(cache) <= self.max_cache_entries and oldest[0] > now:
                break
            cache.popitem(last=False)

    async def _ask(self, key: NodeKey, ip: str) -> tuple[Verdict, str, bool]:
        """One webhook request; returns (verdict, result bucket, cacheable).

        Never waits for a slot: the webhook timeout is the whole time a login may spend here. When
        every slot is busy, or this source already holds its share, the fail-open/fail-closed policy
        decides at once (counted, and logged sampled): a hung webhook under a flood of random keys
        then costs each login at most the timeout, never a place in a queue behind the flood.
        """
        assert self.url is not None
        source = source_bucket(ip)
        held = self._in_flight_by_source.get(source, 0)
        if self._in_flight >= self.max_concurrent or held >= self.max_per_source:
            return self._overflow(key, ip, slots_full=self._in_flight >= self.max_concurrent)
        self._in_flight += 1
        self._in_flight_by_source[source] = held + 1
        try:
            return await self._ask_now(key, ip)
        finally:
            self._in_flight -= 1
            left = self._in_flight_by_source[source] - 1
            if left:
                self._in_flight_by_source[source] = left
            else:
                del self._in_flight_by_source[source]

    def _overflow(self, key: NodeKey, ip: str, *, slots_full: bool) -> tuple[Verdict, str, bool]:
        if slots_full:
            self.stats.overflow_slots_full += 1
            why = f"all {self.max_concurrent} verify requests busy"
        else:
            self.stats.overflow_source_busy += 1
            why = f"this source already has {self.max_per_source} verify requests busy"
        how = "fail-open" if self.fail_open else "fail-closed"
        self._overflow_log.note(key=short_key(key), source=ip, why=why, action="admit" if self.fail_open else "refuse")
        return Verdict(self.fail_open, f"verify-url busy ({how})", detail=why), "error", False

    async def _ask_now(self, key: NodeKey, ip: str) -> tuple[Verdict, str, bool]:
        assert self.url is not None
        body = request_body(key, ip)
        resp = _Response()
        error = ""
        self.stats.requests += 1
        try:
            with trio.move_on_after(self.timeout) as scope:  # the whole exchange: DNS, TCP, TLS, answer
                await self._exchange(body, resp)
        except _TRANSPORT_ERRORS as e:
            error = describe_error(e)
        except Exception as e:  # a bug here must deny, not admit and not kill the connection task
            log.error("admission_verify_internal_error", url=self.url.display, error=repr(e))
            return Verdict(False, "verify-url: internal error", detail=repr(e)), "denied", False
        if scope.cancelled_caught:
            error = f"timeout after {self.timeout:g}s"
        if resp.status is None:
            self._warn_unreachable(key, ip, error or "no response")
            how = "fail-open" if self.fail_open else "fail-closed"
            return Verdict(self.fail_open, f"verify-url unreachable ({how})", detail=error), "error", False
        if resp.status != 200:
            detail = "redirects are not followed; configure the final URL" if 300 <= resp.status < 400 else ""
            return Verdict(False, f"verify-url: HTTP {resp.status}", detail=detail), "denied", False
        if error and not resp.body_error:
            resp.body_error = error
        allowed, reason = decode_admit_response(bytes(resp.body))
        detail = f"body cut short: {resp.body_error}" if resp.body_error and not allowed else ""
        log.debug("admission_verify_answer", key=short_key(key), source=ip, allowed=allowed, reason=reason)
        return Verdict(allowed, reason, detail=detail), "allowed" if allowed else "denied", True

    async def _exchange(self, body: bytes, resp: _Response) -> None:
        """POST ``body``; fill ``resp`` as the status and up to 4 KiB of body arrive.

        Errors before the response head propagate (transport failures). After it, a broken or
        slow body just ends reading: what arrived is decoded, as Go's decoder would.
        """
        url = self.url
        assert url is not None
        stream: trio.abc.Stream = await open_tcp(url.host, url.port)
        if url.scheme == "https":
            assert self._ssl_context is not None
            stream = await start_tls(stream, self._ssl_context, url.host)
        headers = [
            ("Host", url.host_header),
            ("User-Agent", f"derpd/{__version__}"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        if url.authorization:
            headers.append(("Authorization", url.authorization))
        async with HttpClientConnection(stream, max_head=MAX_RESPONSE_HEAD) as http:
            await http.send_request("POST", url.target, headers, body)
            resp.status = (await http.read_response()).status_code
            if resp.status != 200:
                return
            try:
                await http.receive_body(resp.body, MAX_RESPONSE_BODY)
            except _TRANSPORT_ERRORS as e:
                resp.body_error = describe_error(e)

    def _warn_unreachable(self, key: NodeKey, ip: str, error: str) -> None:
        """One warning per WARN_INTERVAL while the webhook is down; a storm must not flood the log."""
        now = self._clock()
        if self._warned_at is not None and now - self._warned_at < WARN_INTERVAL:
            self._suppressed += 1
            return
        assert self.url is not None
        log.warning(
            "admission_verify_unreachable",
            url=self.url.display,
            error=error,
            key=short_key(key),
            source=ip,
            action="admit" if self.fail_open else "refuse",
            suppressed=self._suppressed or None,
        )
        self._warned_at = now
        self._suppressed = 0
