"""The launch host: hostfiles, the job spec and plan, pre-flight, up/down, status and logs."""
