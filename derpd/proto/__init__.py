"""Sans-IO protocol cores: DERP frames and handshake, keys, Go-compatible JSON, PROXY headers. No trio, no sockets."""
