"""derpd: a DERP relay and STUN server for Tailscale and Headscale tailnets."""

__version__ = "0.1.0"
