"""The rank side: the per-rank entry point, the process group and the lock-step loop."""
