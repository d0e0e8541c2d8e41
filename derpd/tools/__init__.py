"""Operator tools: DERP maps (Headscale YAML, Tailscale JSON) and derpd probe."""
