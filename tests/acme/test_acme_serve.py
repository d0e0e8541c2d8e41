"""``derpd serve --certmode letsencrypt`` end to end against pebble (a real RFC 8555 CA) and the FaultProxy.

Each test runs derpd as a subprocess on loopback ports it was given, pebble validating challenges on
those ports, and asserts on what an operator sees: the key=value events (``acme_certificate_issued``,
``acme_certificate_cached``, ``acme_failed``, ``acme_renewal_scheduled``), /metrics, the certificate a
verified TLS handshake gets, DERP clients relaying over it, the files in the certdir, and systemd's
READY=1. Certificates live seconds (pebble's ``certificateValidityPeriod``), so renewal is seen in
seconds; every wait is bounded.
"""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from derpd.net.client import DerpClient

from ..conftest import send_until_delivered
from .conftest import MakeDerpd, MakeStack, Stack
from .derpd_proc import (
    DERPD_CMD,
    AcmeDerpd,
    NotifySocket,
    clean_env,
    handshake_outcome,
    notify_socket,
    parse_seconds,
    parse_time,
)
from .pebble import free_ports

ISSUE_TIMEOUT = 30.0  # first certificate, from process start (python start ~1 s, pebble issues in ~1 s)
FAIL_TIMEOUT = 20.0  # the first acme_failed
MAX_WAIT = 90.0  # the longest any single wait in this module may take (a back-off, a request timeout)
FAILURE_REASONS = {
    "unreachable",
    "timeout",
    "rate_limited",
    "bad_nonce",
    "challenge_failed",
    "account",
    "ca_error",
    "bad_response",
    "storage",
}


@pytest.fixture(scope="module", autouse=True)
def _derpd_has_acme() -> None:
    """Until the implementation lands, say so once per test instead of a wall of usage errors."""
    out = subprocess.run(
        [*DERPD_CMD, "serve", "--help"], capture_output=True, text=True, env=clean_env(), timeout=30, check=False
    )
    if "--acme-directory" not in out.stdout:
        pytest.fail("derpd serve --help lists no --acme-directory: --certmode letsencrypt is not implemented yet")


# --- helpers ----------------------------------------------------------------------------------------


def retry_seconds(event: dict[str, str]) -> float:
    return parse_seconds(event["retry_in"])


def bounded(seconds: float) -> float:
    return min(max(seconds, 1.0), MAX_WAIT)


def sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*ext.get_values_for_type(x509.DNSName), *(str(ip) for ip in ext.get_values_for_type(x509.IPAddress))]


def first_cert_seconds(derpd: AcmeDerpd, issued: dict[str, str]) -> float:
    return parse_time(issued["ts"]) - derpd.started_at


async def relay_both_ways(a: DerpClient, b: DerpClient, tag: bytes) -> None:
    await send_until_delivered(a, b, tag + b" a->b", limit=10)
    await send_until_delivered(b, a, tag + b" b->a", limit=10)


async def derp_pair(derpd: AcmeDerpd, make_ctx: Callable[[], ssl.SSLContext]) -> tuple[DerpClient, DerpClient]:
    """Two DERP clients logged in over verified TLS (each with a fresh context from ``make_ctx``)."""
    with trio.fail_after(10):
        a = await derpd.connect(make_ctx())
        try:
            b = await derpd.connect(make_ctx())
        except BaseException:
            await a.aclose()
            raise
    return a, b


async def check_issued_and_serving(st: Stack, issued: dict[str, str], *, challenge: str, name: str) -> x509.Certificate:
    """The certificate pebble issued is what a verifying client gets, chained to pebble's root, for
    ``name``; the event, the files (and their modes) and the metrics agree with it."""
    derpd, pebble = st.derpd, st.pebble
    assert issued["hostname"] == derpd.hostname, issued
    assert issued["challenge"] == challenge, issued
    assert float(issued["seconds"]) >= 0, issued

    leaf = await derpd.served_leaf(pebble.ssl_context_for_issued(), name)
    assert sans(leaf) == [name]
    intermediate = x509.load_pem_x509_certificate(pebble.intermediate_pem())
    assert leaf.issuer == intermediate.subject
    assert abs(parse_time(issued["not_after"]) - leaf.not_valid_after_utc.timestamp()) <= 1, issued

    # Files: HOSTNAME.pem (key + full chain) and the account, all 0600.
    certdir = derpd.effective_certdir
    pems = sorted(p.name for p in certdir.glob("*.pem"))
    if name == "derp.test":
        assert pems == ["derp.test.pem"], sorted(os.listdir(certdir))
    else:
        assert len(pems) == 1, sorted(os.listdir(certdir))
    bundle = (certdir / pems[0]).read_bytes()
    assert b"PRIVATE KEY-----" in bundle
    chain = x509.load_pem_x509_certificates(bundle)
    assert chain[0] == leaf and len(chain) >= 2 and chain[1] == intermediate
    account_keys, account_docs = list(certdir.glob("acme-account-*.key")), list(certdir.glob("acme-account-*.json"))
    assert account_keys and account_docs, sorted(os.listdir(certdir))
    for path in [certdir / pems[0], *account_keys, *account_docs]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, f"{path.name}: mode {mode:o}"

    # Metrics: the served certificate's bounds, one issuance, the next renewal ahead. The gauge is set
    # with the acme_renewal_scheduled line, which follows the issuance after one more round trip to
    # the CA (its renewalInfo): until then it still holds the first order's time, in the past.
    await derpd.wait_event("acme_renewal_scheduled", 10)
    samples = await trio.to_thread.run_sync(derpd.metrics)
    assert samples.get(("derpd_tls_cert_not_after_seconds", frozenset())) == leaf.not_valid_after_utc.timestamp()
    assert samples.get(("derpd_tls_cert_not_before_seconds", frozenset())) == leaf.not_valid_before_utc.timestamp()
    assert samples.get(("derpd_acme_certificates_issued_total", frozenset())) == 1
    renewal = samples.get(("derpd_acme_next_renewal_seconds", frozenset()))
    assert renewal is not None and time.time() - 1 < renewal < leaf.not_valid_after_utc.timestamp(), renewal
    return leaf


def expected_renewal(leaf: x509.Certificate) -> float:
    nb, na = leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
    return nb + (na - nb) * 2 / 3


def check_renewal_scheduled(event: dict[str, str], leaf: x509.Certificate, why: str = "lifetime") -> None:
    lifetime = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    at = parse_time(event["at"])
    assert event["why"] == why, event
    tolerance = max(2.0, lifetime * 0.1)
    assert abs(at - expected_renewal(leaf)) <= tolerance, (
        f"renewal at {at} ({datetime.fromtimestamp(at, UTC)}), expected two thirds into "
        f"{leaf.not_valid_before_utc}..{leaf.not_valid_after_utc} = {expected_renewal(leaf)} ± {tolerance:g}s: {event}"
    )


def check_failed(event: dict[str, str], reason: str) -> None:
    """An acme_failed line: the expected reason, a positive retry_in, an error text."""
    assert event.get("reason") in FAILURE_REASONS, event
    assert event["reason"] == reason, f"reason={event['reason']}, expected {reason}: {event}"
    assert retry_seconds(event) > 0, event
    assert event.get("error"), event


def failure_total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], reason: str) -> float:
    return samples.get(("derpd_acme_failures_total", frozenset({("reason", reason)})), 0.0)


async def stop_cleanly(derpd: AcmeDerpd, notify: NotifySocket) -> None:
    """SIGTERM while the notify socket still listens: STOPPING=1 and exit status 0."""
    assert await trio.to_thread.run_sync(derpd.stop) == 0, derpd.tail()
    await notify.wait_for(b"STOPPING=1", 5)


def assert_clean(derpd: AcmeDerpd) -> None:
    problems = derpd.problems()
    assert not problems, "tracebacks in the log:\n" + "\n".join(problems[:5])


def reasons(events: Iterable[dict[str, str]]) -> list[str]:
    return [e.get("reason", "?") for e in events]


# --- issuance -------------------------------------------------------------------------------------------


async def test_tls_alpn_01_certificate_serves_derp_clients(make_stack: MakeStack) -> None:
    st = make_stack(challenge="tls-alpn-01", http=False, validity_seconds=3600)
    async with notify_socket() as notify:
        st.derpd.env["NOTIFY_SOCKET"] = str(notify.path)
        st.derpd.start()
        (issued,) = await st.derpd.wait_event("acme_certificate_issued", ISSUE_TIMEOUT)
        print(f"\nTLS-ALPN-01: first certificate {first_cert_seconds(st.derpd, issued):.2f}s after start")
        leaf = await check_issued_and_serving(st, issued, challenge="tls-alpn-01", name="derp.test")
        ready_at = await notify.wait_for(b"READY=1", 10)
        assert ready_at >= parse_time(issued["ts"]) - 0.05, "READY=1 before the certificate was issued"
        scheduled = st.derpd.events("acme_renewal_scheduled")
        assert scheduled, st.derpd.tail()
        check_renewal_scheduled(scheduled[-1], leaf)
        a, b = await derp_pair(st.derpd, st.pebble.ssl_context_for_issued)
        async with a, b:
            assert a.fast_start and b.fast_start, "no meta certificate in the chain: derper's fast start not offered"
            await relay_both_ways(a, b, b"over pebble's certificate")
        await stop_cleanly(st.derpd, notify)
    assert not st.derpd.events("acme_failed"), st.derpd.tail()
    assert_clean(st.derpd)


async def test_http_01_certificate_from_a_config_file(make_stack: MakeStack) -> None:
    """HTTP-01 on the port-80 listener; the ACME settings come from a TOML --config and the
    environment, and the certdir is the default (``certs`` beside the key file)."""
    st = make_stack(acme_flags=False, certdir=False, validity_seconds=3600)
    config = st.derpd.workdir / "derpd.toml"
    config.write_text(
        f'acme-directory = "{st.directory_url}"\nacme-challenge = "http-01"\nacme-email = "ops@derp.test"\n'
    )
    st.derpd.args += ["--config", str(config)]
    st.derpd.env["DERPD_ACME_CA_FILE"] = str(st.pebble.ca_file)
    st.derpd.start()
    (issued,) = await st.derpd.wait_event("acme_certificate_issued", ISSUE_TIMEOUT)
    print(f"\nHTTP-01: first certificate {first_cert_seconds(st.derpd, issued):.2f}s after start")
    assert st.derpd.effective_certdir == st.derpd.workdir / "certs"
    await check_issued_and_serving(st, issued, challenge="http-01", name="derp.test")
    a, b = await derp_pair(st.derpd, st.pebble.ssl_context_for_issued)
    async with a, b:
        assert a.fast_start and b.fast_start
        await relay_both_ways(a, b, b"http-01")
    assert_clean(st.derpd)


async def test_ip_address_certificate(make_stack: MakeStack) -> None:
    """``--hostname 127.0.0.1`` (and the ``acme`` alias): an RFC 8738 IP certificate, by TLS-ALPN-01
    first in auto mode (pebble's SNI is then 1.0.0.127.in-addr.arpa)."""
    st = make_stack(hostname="127.0.0.1", certmode="acme", validity_seconds=3600)
    st.derpd.start()
    (issued,) = await st.derpd.wait_event("acme_certificate_issued", ISSUE_TIMEOUT)
    leaf = await check_issued_and_serving(st, issued, challenge="tls-alpn-01", name="127.0.0.1")
    assert (
        leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        == []
    )
    with trio.fail_after(10):
        a = await DerpClient.connect(
            f"https://127.0.0.1:{st.tls_port}/derp", ssl_context=st.pebble.ssl_context_for_issued()
        )
        b = await DerpClient.connect(
            f"https://127.0.0.1:{st.tls_port}/derp", ssl_context=st.pebble.ssl_context_for_issued()
        )
    async with a, b:
        await relay_both_ways(a, b, b"ip certificate")
    assert_clean(st.derpd)


async def test_auto_falls_back_to_http_01(make_stack: MakeStack) -> None:
    """Auto mode: TLS-ALPN-01 fails (pebble validates it on a port nobody listens on), HTTP-01 works."""
    st = make_stack(dead_tls_port=True, validity_seconds=3600)
    st.derpd.start()
    (issued,) = await st.derpd.wait_event("acme_certificate_issued", 45)
    failures = st.derpd.events("acme_failed")
    print(
        f"\nauto fallback: issued {first_cert_seconds(st.derpd, issued):.2f}s after start; failures {reasons(failures)}"
    )
    await check_issued_and_serving(st, issued, challenge="http-01", name="derp.test")
    assert set(reasons(failures)) <= {"challenge_failed"}, failures
    assert_clean(st.derpd)


async def test_challenge_failure_is_reported(make_stack: MakeStack) -> None:
    """Only TLS-ALPN-01 allowed and pebble cannot reach it: reason challenge_failed, retried later."""
    st = make_stack(challenge="tls-alpn-01", dead_tls_port=True, validity_seconds=3600)
    st.derpd.start()
    failed, *_ = await st.derpd.wait_event("acme_failed", FAIL_TIMEOUT)
    check_failed(failed, "challenge_failed")
    assert retry_seconds(failed) > 0
    samples = await trio.to_thread.run_sync(st.derpd.metrics)
    assert failure_total(samples, "challenge_failed") >= 1
    assert not st.derpd.events("acme_certificate_issued")
    assert_clean(st.derpd)


# --- renewal --------------------------------------------------------------------------------------------


async def test_renewal_swaps_the_certificate_without_dropping_anything(make_stack: MakeStack) -> None:
    """Two clients keep relaying and new handshakes keep coming while the certificate (12 s) renews at
    two thirds of its life: no handshake fails, no connection drops, the new certificate is served.
    The renewal's TLS-ALPN-01 validation connects to the same port while the clients handshake."""
    st = make_stack(challenge="tls-alpn-01", validity_seconds=12)
    st.derpd.start()
    (issued,) = await st.derpd.wait_event("acme_certificate_issued", ISSUE_TIMEOUT)
    print(f"\nrenewal test: first certificate {first_cert_seconds(st.derpd, issued):.2f}s after start")
    ctx = st.pebble.ssl_context_for_issued
    first = await st.derpd.served_leaf(ctx(), "derp.test")
    (scheduled,) = await st.derpd.wait_event("acme_renewal_scheduled", 5)
    check_renewal_scheduled(scheduled, first)
    mark = st.derpd.mark()
    handshakes = {"ok": 0, "failed": 0}
    serials: list[int] = []
    failures: list[str] = []
    relayed = 0
    a, b = await derp_pair(st.derpd, ctx)
    async with a, b:
        renewed = trio.Event()

        async def keep_relaying() -> None:
            nonlocal relayed
            n = 0
            while not renewed.is_set():
                n += 1
                await relay_both_ways(a, b, b"%d" % n)
                relayed += 1
                await trio.sleep(0.05)

        async def keep_handshaking() -> None:
            while not renewed.is_set():
                try:
                    leaf = await st.derpd.served_leaf(ctx(), "derp.test", timeout=3)
                    handshakes["ok"] += 1
                    if not serials or serials[-1] != leaf.serial_number:
                        serials.append(leaf.serial_number)
                except (OSError, trio.TooSlowError, trio.BrokenResourceError) as e:
                    handshakes["failed"] += 1
                    failures.append(repr(e))
                await trio.sleep(0.1)

        async def watch() -> None:
            wait = expected_renewal(first) - time.time() + 20
            await st.derpd.wait_event("acme_certificate_issued", bounded(wait), since=mark)
            await trio.sleep(1.0)  # and a little more traffic on the new certificate
            renewed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_relaying)
            nursery.start_soon(keep_handshaking)
            nursery.start_soon(watch)
        await relay_both_ways(a, b, b"after the renewal, same connections")
    (again,) = st.derpd.events("acme_certificate_issued", since=mark)
    second = await st.derpd.served_leaf(ctx(), "derp.test")
    print(
        f"renewal: {handshakes['ok']} handshakes ok, {handshakes['failed']} failed, {relayed} round trips; "
        f"renewed {parse_time(again['ts']) - first.not_valid_before_utc.timestamp():.2f}s into a "
        f"{(first.not_valid_after_utc - first.not_valid_before_utc).total_seconds():.0f}s certificate"
    )
    assert handshakes["failed"] == 0, failures[:5]
    assert second.serial_number != first.serial_number and second.not_valid_after_utc > first.not_valid_after_utc
    assert serials[0] == first.serial_number and serials[-1] == second.serial_number, serials
    renewed_at = parse_time(again["ts"])
    assert renewed_at >= expected_renewal(first) - 2, "renewed before two thirds of the lifetime"
    assert renewed_at < first.not_valid_after_utc.timestamp(), "renewed only after the certificate expired"
    await st.derpd.wait_event("acme_renewal_scheduled", 10, count=2)  # the new certificate's
    samples = await trio.to_thread.run_sync(st.derpd.metrics)
    assert samples[("derpd_tls_cert_not_after_seconds", frozenset())] == second.not_valid_after_utc.timestamp()
    assert samples[("derpd_acme_certificates_issued_total", frozenset())] == 2
    assert samples[("derpd_acme_next_renewal_seconds", frozenset())] > renewed_at
    assert_clean(st.derpd)


async def test_renewal_follows_the_ari_window(make_stack: MakeStack) -> None:
    """With renewalInfo in the directory, derpd renews in the CA's suggested window, not at 2/3. Pebble
    reuses the valid authorization here (PEBBLE_AUTHZREUSE=100, as Let's Encrypt does within its reuse
    period), so the renewal's order needs no challenge: derpd must see that and finalize."""
    st = make_stack(challenge="tls-alpn-01", proxy=True, validity_seconds=3600, authz_reuse=100)
    assert st.proxy is not None
    now = time.time()
    start, end = datetime.fromtimestamp(now + 8, UTC), datetime.fromtimestamp(now + 10, UTC)
    st.proxy.set_mode("ari", start=start, end=end)
    st.derpd.start()
    (issued,) = await st.derpd.wait_event("acme_certificate_issued", ISSUE_TIMEOUT)
    first = await st.derpd.served_leaf(st.pebble.ssl_context_for_issued(), "derp.test")
    scheduled = await st.derpd.wait_event("acme_renewal_scheduled", 10, why="ari")
    at = parse_time(scheduled[-1]["at"])
    assert start.timestamp() - 1 <= at <= end.timestamp() + 1, (scheduled[-1], start, end)
    assert st.proxy.count("/renewal-info/", "GET") >= 1
    # The renewed certificate's own window is a day away (else it would renew again at once).
    later = datetime.fromtimestamp(time.time() + 86400, UTC)
    st.proxy.set_mode("ari", start=later, end=later)
    mark = st.derpd.mark()
    await st.derpd.wait_event("acme_certificate_issued", bounded(end.timestamp() - time.time() + 15), since=mark)
    second = await st.derpd.served_leaf(st.pebble.ssl_context_for_issued(), "derp.test")
    assert second.serial_number != first.serial_number
    renewed = st.derpd.events("acme_certificate_issued", since=mark)
    assert start.timestamp() - 1 <= parse_time(renewed[0]["ts"]) <= end.timestamp() + 5, (renewed, start, end)
    assert parse_time(issued["ts"]) < start.timestamp()
    # The spec's challenge field names tls-alpn-01|http-01; with nothing to validate derpd says "reused".
    assert renewed[0]["challenge"] in ("tls-alpn-01", "http-01", "reused"), renewed[0]
    assert_clean(st.derpd)


async def test_restart_serves_the_cached_certificate_and_orders_nothing(make_stack: MakeStack) -> None:
    """A restart with a valid certificate in the certdir serves it at once, says READY=1, logs
    acme_certificate_cached and sends no newOrder (the FaultProxy counts them)."""
    st = make_stack(challenge="tls-alpn-01", proxy=True, validity_seconds=3600)
    assert st.proxy is not None
    st.derpd.start()
    await st.derpd.wait_event("acme_certificate_issued", ISSUE_TIMEOUT)
    ctx = st.pebble.ssl_context_for_issued
    first = await st.derpd.served_leaf(ctx(), "derp.test")
    assert len(st.proxy.new_orders()) == 1
    assert st.derpd.stop() == 0, st.derpd.tail()
    async with notify_socket() as notify:
        st.derpd.env["NOTIFY_SOCKET"] = str(notify.path)
        st.derpd.start()
        await notify.wait_for(b"READY=1", 15)
        served_after = time.time() - st.derpd.started_at
        leaf = await st.derpd.served_leaf(ctx(), "derp.test")
        print(f"\ncached certificate: READY=1 {served_after:.2f}s after the restart")
        assert leaf.serial_number == first.serial_number
        await trio.sleep(2.0)
        assert len(st.proxy.new_orders()) == 1, st.proxy.paths()
        assert not st.derpd.events("acme_certificate_issued"), st.derpd.tail()
        scheduled = await st.derpd.wait_event("acme_renewal_scheduled", 10)
        check_renewal_scheduled(scheduled[-1], first)
        samples = await trio.to_thread.run_sync(st.derpd.metrics)
        assert samples[("derpd_tls_cert_not_after_seconds", frozenset())] == first.not_valid_after_utc.timestamp()
        assert samples.get(("derpd_acme_certificates_issued_total", frozenset())) == 0
        assert samples[("derpd_acme_next_renewal_seconds", frozenset())] == pytest.approx(
            expected_renewal(first), abs=60
        )
        await stop_cleanly(st.derpd, notify)
    assert_clean(st.derpd)
    cached = st.derpd.events("acme_certificate_cached")
    assert len(cached) == 1, "no event=acme_certificate_cached in the restarted derpd's log:\n" + st.derpd.tail()
    assert cached[0]["hostname"] == "derp.test"


# --- the CA misbehaves --------------------------------------------------------------------------------


async def test_ca_down_at_start_then_up(make_stack: MakeStack) -> None:
    """No certificate yet: handshakes fail at once with an alert, no READY=1; derpd retries with a
    logged back-off, and serves (and says READY=1) once pebble is up."""
    st = make_stack(challenge="tls-alpn-01", start_pebble=False, validity_seconds=3600)
    async with notify_socket() as notify:
        st.derpd.env["NOTIFY_SOCKET"] = str(notify.path)
        st.derpd.start()
        await st.derpd.wait_metrics()
        failed, *_ = await st.derpd.wait_event("acme_failed", FAIL_TIMEOUT)
        check_failed(failed, "unreachable")
        assert retry_seconds(failed) > 0, failed
        outcome, took = await handshake_outcome(st.tls_port, "derp.test")
        assert outcome.startswith("ssl: ") and took < 2.0, (outcome, took)
        failures = await st.derpd.wait_event("acme_failed", bounded(retry_seconds(failed) + 10), count=2)
        gap = parse_time(failures[1]["ts"]) - parse_time(failures[0]["ts"])
        assert retry_seconds(failed) - 0.5 <= gap <= retry_seconds(failed) + 5, (gap, failures)
        samples = await trio.to_thread.run_sync(st.derpd.metrics)
        assert failure_total(samples, "unreachable") >= 2
        await notify.collect(0.2)
        assert not any(b"READY=1" in d for _, d in notify.got), notify.got
        # Meanwhile systemd is asked for more start-up time and told what derpd waits for.
        assert any(b"EXTEND_TIMEOUT_USEC=" in d for _, d in notify.got), notify.got
        waiting = [d for _, d in notify.got if b"STATUS=waiting for a certificate for derp.test" in d]
        assert waiting and any(b"unreachable" in d for d in waiting), notify.got
        print(f"\nCA down: retry_in {[f['retry_in'] for f in failures]}")

        await trio.to_thread.run_sync(st.pebble.start)
        latest = st.derpd.events("acme_failed")[-1]
        (issued,) = await st.derpd.wait_event("acme_certificate_issued", bounded(retry_seconds(latest) + 20))
        ready_at = await notify.wait_for(b"READY=1", 10)
        assert ready_at >= parse_time(issued["ts"]) - 0.05
        await check_issued_and_serving(st, issued, challenge="tls-alpn-01", name="derp.test")
        await stop_cleanly(st.derpd, notify)
    assert set(reasons(st.derpd.events("acme_failed"))) == {"unreachable"}
    assert_clean(st.derpd)


async def test_ca_down_at_renewal_keeps_serving(make_stack: MakeStack) -> None:
    """Pebble stops after the first certificate: at renewal time derpd fails (counted), keeps serving the
    certificate it has, and renews (with a new account: pebble forgot everything) once pebble is back."""
    st = make_stack(challenge="tls-alpn-01", validity_seconds=12)
    st.derpd.start()
    await st.derpd.wait_event("acme_certificate_issued", ISSUE_TIMEOUT)
    old_ctx = st.pebble.ssl_context_for_issued
    old_root = st.pebble.root_pem()
    first = await st.derpd.served_leaf(old_ctx(), "derp.test")
    await trio.to_thread.run_sync(st.pebble.stop)
    mark = st.derpd.mark()
    wait = bounded(expected_renewal(first) - time.time() + 10)
    failed, *_ = await st.derpd.wait_event("acme_failed", wait, since=mark)
    check_failed(failed, "unreachable")
    assert time.time() < first.not_valid_after_utc.timestamp(), "the renewal was not tried before expiry"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=old_root.decode())
    leaf = await st.derpd.served_leaf(ctx, "derp.test")
    assert leaf.serial_number == first.serial_number
    samples = await trio.to_thread.run_sync(st.derpd.metrics)
    assert failure_total(samples, "unreachable") >= 1
    assert samples[("derpd_tls_cert_not_after_seconds", frozenset())] == first.not_valid_after_utc.timestamp()

    await trio.to_thread.run_sync(st.pebble.start)
    latest = st.derpd.events("acme_failed")[-1]
    await st.derpd.wait_event("acme_certificate_issued", bounded(retry_seconds(latest) + 20), since=mark)
    second = await st.derpd.served_leaf(st.pebble.ssl_context_for_issued(), "derp.test")
    assert second.serial_number != first.serial_number
    assert_clean(st.derpd)


async def test_rate_limited_retry_after_is_honoured(make_stack: MakeStack) -> None:
    st = make_stack(challenge="tls-alpn-01", proxy=True, validity_seconds=3600)
    assert st.proxy is not None
    retry_after = 6
    st.proxy.set_mode("rate_limited", retry_after=retry_after)
    st.derpd.start()
    failed, *_ = await st.derpd.wait_event("acme_failed", FAIL_TIMEOUT)
    check_failed(failed, "rate_limited")
    assert retry_seconds(failed) >= retry_after - 0.5, failed
    limited = st.proxy.new_orders()
    assert limited and all(s.status == 429 for s in limited), limited
    first_429 = limited[0].at
    st.proxy.set_mode("pass")
    await st.derpd.wait_event("acme_certificate_issued", bounded(retry_seconds(failed) + 20))
    orders = st.proxy.new_orders()
    assert len([s for s in orders if s.status == 429]) == 1, orders
    next_order = next(s for s in orders if s.at > first_429)
    assert next_order.at - first_429 >= retry_after - 0.2, f"asked again {next_order.at - first_429:.2f}s after the 429"
    samples = await trio.to_thread.run_sync(st.derpd.metrics)
    assert failure_total(samples, "rate_limited") == 1
    assert_clean(st.derpd)


@pytest.mark.parametrize("where", ["directory", "newOrder"])
async def test_bad_json_from_the_ca(make_stack: MakeStack, where: str) -> None:
    """A 200 whose body is not JSON (for every request, or only newOrder's answer): reason
    bad_response; derpd retries and gets its certificate once the CA answers properly."""
    st = make_stack(challenge="tls-alpn-01", proxy=True, validity_seconds=3600)
    assert st.proxy is not None
    st.proxy.set_mode("bad_json", path=None if where == "directory" else st.proxy.new_order_path)
    st.derpd.start()
    failed, *_ = await st.derpd.wait_event("acme_failed", FAIL_TIMEOUT)
    check_failed(failed, "bad_response")
    assert st.derpd.alive()
    st.proxy.set_mode("pass")
    await st.derpd.wait_event("acme_certificate_issued", bounded(retry_seconds(failed) + 20))
    samples = await trio.to_thread.run_sync(st.derpd.metrics)
    assert failure_total(samples, "bad_response") >= 1
    assert_clean(st.derpd)


async def test_error_500_from_the_ca(make_stack: MakeStack) -> None:
    st = make_stack(challenge="tls-alpn-01", proxy=True, validity_seconds=3600)
    assert st.proxy is not None
    st.proxy.set_mode("error500")
    st.derpd.start()
    failed, *_ = await st.derpd.wait_event("acme_failed", FAIL_TIMEOUT)
    check_failed(failed, "ca_error")
    samples = await trio.to_thread.run_sync(st.derpd.metrics)
    assert failure_total(samples, "ca_error") >= 1
    assert_clean(st.derpd)


async def test_hanging_ca_times_out_and_derpd_stays_responsive(make_stack: MakeStack) -> None:
    st = make_stack(challenge="tls-alpn-01", proxy=True, validity_seconds=3600)
    assert st.proxy is not None
    st.proxy.set_mode("hang")
    st.derpd.start()
    await st.derpd.wait_metrics()
    t0 = trio.current_time()
    await trio.sleep(1.0)
    assert st.proxy.count() >= 1, "derpd has not asked the CA anything yet"
    # While the request hangs: metrics, the plain-HTTP listener and the TLS listener all answer at once.
    t = trio.current_time()
    await trio.to_thread.run_sync(st.derpd.metrics_text)
    outcome, took = await handshake_outcome(st.tls_port, "derp.test")
    assert outcome.startswith("ssl: ") and took < 2.0, (outcome, took)
    assert trio.current_time() - t < 3.0
    failed, *_ = await st.derpd.wait_event("acme_failed", MAX_WAIT)
    print(f"\nhanging CA: acme_failed after {trio.current_time() - t0:.1f}s: {failed}")
    check_failed(failed, "timeout")
    st.proxy.set_mode("pass")
    await st.derpd.wait_event("acme_certificate_issued", bounded(retry_seconds(failed) + 20))
    samples = await trio.to_thread.run_sync(st.derpd.metrics)
    assert failure_total(samples, "timeout") >= 1
    assert_clean(st.derpd)


async def test_bad_nonce_every_time(make_stack: MakeStack) -> None:
    """Pebble rejects every nonce: derpd retries badNonce (a bounded number of times) and then reports it."""
    st = make_stack(challenge="tls-alpn-01", nonce_reject=100, validity_seconds=3600)
    st.derpd.start()
    failed, *_ = await st.derpd.wait_event("acme_failed", FAIL_TIMEOUT)
    check_failed(failed, "bad_nonce")
    assert retry_seconds(failed) > 0
    assert st.derpd.alive()
    samples = await trio.to_thread.run_sync(st.derpd.metrics)
    assert failure_total(samples, "bad_nonce") >= 1
    assert_clean(st.derpd)


async def test_external_account_binding(make_stack: MakeStack, make_derpd: MakeDerpd) -> None:
    """A CA that requires EAB: without kid/key the account is refused (reason account); with the
    right ones (here from the environment) the certificate is issued."""
    kid, hmac_key = "derpd-kid", "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"
    st = make_stack(
        challenge="tls-alpn-01",
        eab_required=True,
        eab_keys={kid: hmac_key},
        validity_seconds=3600,
        env={"DERPD_ACME_EAB_KID": kid, "DERPD_ACME_EAB_KEY": hmac_key},
    )
    tls_port, http_port = free_ports(2)
    without = make_derpd(
        tls_port=tls_port,
        http_port=http_port,
        directory_url=st.pebble.directory_url,
        ca_file=st.pebble.ca_file,
        args=["--acme-challenge", "tls-alpn-01"],
        name="derpd-no-eab",
    )
    without.start()
    st.derpd.start()
    failed, *_ = await without.wait_event("acme_failed", FAIL_TIMEOUT)
    check_failed(failed, "account")
    (issued,) = await st.derpd.wait_event("acme_certificate_issued", ISSUE_TIMEOUT)
    await check_issued_and_serving(st, issued, challenge="tls-alpn-01", name="derp.test")
    samples = await trio.to_thread.run_sync(without.metrics)
    assert failure_total(samples, "account") >= 1
    assert_clean(st.derpd)
    assert_clean(without)


# --- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hostname",
    ["bad_name!", "-x.test", "a..b", "a" * 64 + ".test", ".".join(["a" * 63] * 4), "x.test-", ""],
    ids=["punct", "leading-hyphen", "empty-label", "long-label", "long-name", "trailing-hyphen", "empty"],
)
async def test_bad_hostname_is_refused_at_start(hostname: str, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    cmd = [*DERPD_CMD, "serve", "--addr", f"127.0.0.1:{port}", "--http-port", "-1", "--stun-port", "-1"]
    cmd += ["--metrics-addr", "-1", "--key-file", f"{tmp_path}/derper.key", "--certmode", "letsencrypt"]
    cmd += ["--hostname", hostname, "--acme-directory", "https://127.0.0.1:9/dir"]
    with trio.fail_after(30):
        result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False, env=clean_env())
    lines = [ln for ln in result.stderr.decode().splitlines() if ln.strip()]
    assert result.returncode == 2, (result.returncode, lines)
    assert len(lines) == 1 and lines[0].startswith("derpd: error:"), lines


@pytest.mark.parametrize(
    "args",
    [
        ["--acme-eab-kid", "kid-1"],
        ["--acme-directory", "http://127.0.0.1:9/dir"],
        ["--acme-ca-file", "/nonexistent/ca.pem"],
    ],
    ids=["eab-kid-without-key", "plain-http-directory", "missing-ca-file"],
)
async def test_bad_acme_settings_are_refused_at_start(args: list[str], tmp_path: Path) -> None:
    """Like every bad flag: one ``derpd: error:`` line and exit status 2 before anything starts."""
    (port,) = free_ports(1)
    cmd = [*DERPD_CMD, "serve", "--addr", f"127.0.0.1:{port}", "--http-port", "-1", "--stun-port", "-1"]
    cmd += ["--metrics-addr", "-1", "--key-file", f"{tmp_path}/derper.key", "--certmode", "letsencrypt"]
    cmd += ["--hostname", "derp.test", "--acme-directory", "https://127.0.0.1:9/dir", *args]
    with trio.fail_after(30):
        result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False, env=clean_env())
    lines = [ln for ln in result.stderr.decode().splitlines() if ln.strip()]
    assert result.returncode == 2, (result.returncode, lines)
    assert len(lines) == 1 and lines[0].startswith("derpd: error:"), lines


# --- --workers ------------------------------------------------------------------------------------------


async def test_workers_share_one_certificate_and_its_renewal(make_stack: MakeStack) -> None:
    """``--workers 2``: the supervisor orders, either worker answers the CA's TLS-ALPN-01 connections
    (through the challenge files), both serve the certificate, and both pick up the renewal."""
    st = make_stack(challenge="tls-alpn-01", http=False, validity_seconds=15, args=["--workers", "2"])
    st.derpd.start()
    (issued,) = await st.derpd.wait_event("acme_certificate_issued", ISSUE_TIMEOUT)
    assert issued["challenge"] == "tls-alpn-01", issued

    async def leaves(n: int) -> set[bytes]:
        """The leaves n fresh connections get (the kernel spreads them over the workers)."""
        found: set[bytes] = set()
        for _ in range(n):
            leaf = await st.derpd.served_leaf(st.pebble.ssl_context_for_issued(), "derp.test")
            found.add(leaf.fingerprint(hashes.SHA256()))
        return found

    with trio.fail_after(10):  # the workers look for the supervisor's file every 2 s
        while True:
            try:
                first = await leaves(12)
                break
            except (trio.BrokenResourceError, ssl.SSLError, OSError):
                await trio.sleep(0.2)  # a worker that has not picked it up yet answers with an alert
    assert len(first) == 1, "two workers serve different certificates"
    assert st.derpd.events("acme_tls_alpn_answered"), st.derpd.tail()
    a, b = await derp_pair(st.derpd, st.pebble.ssl_context_for_issued)
    async with a, b:
        await relay_both_ways(a, b, b"across workers")
    await st.derpd.wait_event("acme_certificate_issued", 30, count=2)  # renewed at two thirds of 15 s
    with trio.fail_after(10):
        while True:
            now = await leaves(12)
            if len(now) == 1 and not now & first:  # every worker serves the new one
                break
            await trio.sleep(0.5)
    assert not st.derpd.events("acme_failed"), st.derpd.tail()
    assert_clean(st.derpd)
