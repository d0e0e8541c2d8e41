"""derpd's STUN server: ``stun.codec`` (sans-IO messages) and ``stun.server`` (the trio responder).

Kept import-light on purpose: importing ``stun.codec`` pulls in neither trio nor logging.
"""
