"""dslaunch: one command to start, inspect and stop a torch.distributed inference job over SSH."""

__version__ = "0.1.0"
