"""Bottom layer: logging, escaping untrusted text, atomic files. Imports nothing else from derpd."""
