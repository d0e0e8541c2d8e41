"""The STUN codec, sans I/O: ``stun.codec`` turns datagrams into binding requests and builds the answers
(Tailscale's, RFC 5389/8489 and classic RFC 3489, the 420 error). It imports nothing from derpd, trio or
logging; derpd's UDP responder is ``derpd.server.stun``.
"""
