"""The node side: `python -m dslaunch.node.ctl OP`, standard library only."""
