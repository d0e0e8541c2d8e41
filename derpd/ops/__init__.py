"""Running the node: the runtime loop, key files, metrics, systemd, --workers."""
