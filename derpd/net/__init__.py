"""Moving bytes: addresses and binding, transports, TLS, WebSocket, the HTTP cores and derpd's DERP client."""
