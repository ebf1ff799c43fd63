"""Telling a lost peer from a rank's own error, on a real two-process gloo group.

A rank whose collective fails because another rank went away must wait for the agent's restart
instead of failing too (a second failure would make torchrun restart the gang twice).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.simnodes import free_port

RANK = textwrap.dedent(
    """
    import os, sys, time
    from datetime import timedelta
    import torch, torch.distributed as dist
    from dslaunch.rank.lockstep import peer_lost
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    t = torch.zeros(1)
    dist.broadcast(t, src=0)
    if rank == 1:
        os._exit(0)  # gone, as a killed rank is: no goodbye to the group
    time.sleep(0.5)
    try:
        dist.broadcast(t, src=0)
        print("no error")
    except Exception as e:
        print("peer_lost", peer_lost(e), "own_error", peer_lost(ValueError("bad shape")), type(e).__name__)
    """
)


def test_a_collective_failed_by_a_vanished_peer_is_recognised() -> None:
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(r), port], stdout=subprocess.PIPE, text=True, env=env)
             for r in (0, 1)]  # fmt: skip
    try:
        out0, _ = procs[0].communicate(timeout=120)
        procs[1].wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "peer_lost True own_error False" in out0, out0
