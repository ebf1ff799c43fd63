"""How commands reach a node: local and SSH transports, and the parallel fan-out over nodes."""
