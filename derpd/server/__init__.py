"""A DERP node: relay routing and output, mesh, admission, limits, the HTTP front, STUN, composition."""
