"""The Slurm launcher's selection against DeepSpeed's SlurmRunner, its own functions as the oracle.

The allocation's nodes and slots are filtered by --include/--exclude/--num-nodes/--num-gpus as a
hostfile's are; `srun_selection` must then say it in srun's flags exactly as DeepSpeed's
`SlurmRunner.get_cmd` does (the flags between `srun` and `--export`), for every combination
DeepSpeed accepts. No Slurm is needed: `scontrol show hostnames` is not called here.
"""

from __future__ import annotations

import argparse
import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dslaunch.errors import UserError
from dslaunch.launch.hostfile import Node, select_nodes
from dslaunch.launch.slurmalloc import choose_launcher, per_node_counts, srun_selection

runner = pytest.importorskip("deepspeed.launcher.runner")
multinode = pytest.importorskip("deepspeed.launcher.multinode_runner")


def ds_flags(pool: dict[str, int], include: str, exclude: str, num_nodes: int, num_gpus: int) -> list[str] | None:
    """DeepSpeed's srun flags for this pool and filter; None where DeepSpeed refuses it."""
    try:
        active = runner.parse_inclusion_exclusion(collections.OrderedDict(pool), include, exclude)
        active = runner.apply_num_nodes_and_gpus(active, num_nodes, num_gpus)
        args = argparse.Namespace(include=include, exclude=exclude, num_nodes=num_nodes, num_gpus=num_gpus,
                                  launcher_args="", user_script="serve.py", user_args=[], slurm_comment="")  # fmt: skip
        cmd = multinode.SlurmRunner(args, "e30=", active).get_cmd({}, active)
    except (ValueError, KeyError, IndexError):
        return None
    return cmd[1 : next(i for i, a in enumerate(cmd) if a.startswith("--export"))]


def our_flags(pool: dict[str, int], include: str, exclude: str, num_nodes: int, num_gpus: int) -> list[str]:
    nodes = [Node(h, s) for h, s in pool.items()]
    active = select_nodes(nodes, include or None, exclude or None, num_nodes if num_nodes > 0 else None,
                          num_gpus if num_gpus > 0 else None)  # fmt: skip
    return srun_selection(active, include or None, exclude or None, num_nodes, num_gpus)


POOL = {"sn1": 4, "sn2": 4, "sn3": 4}


@pytest.mark.parametrize(
    "include,exclude,num_nodes,num_gpus",
    [
        ("", "", -1, -1),
        ("sn1@sn3", "", -1, -1),
        ("", "sn2", -1, -1),
        ("sn2:0,1@sn3:0,1", "", -1, -1),
        ("", "", 2, -1),
        ("", "", -1, 2),
        ("", "", 2, 2),
        ("", "sn1:2,3@sn2:2,3@sn3:2,3", -1, -1),
    ],
)
def test_flags_match_deepspeeds_slurm_runner(include: str, exclude: str, num_nodes: int, num_gpus: int) -> None:
    want = ds_flags(POOL, include, exclude, num_nodes, num_gpus)
    assert want is not None
    assert our_flags(POOL, include, exclude, num_nodes, num_gpus) == want


@settings(max_examples=150, deadline=None)
@given(
    hosts=st.lists(st.sampled_from(["sn1", "sn2", "sn3", "sn4"]), min_size=1, max_size=4, unique=True),
    slots=st.integers(1, 4),
    pick=st.lists(st.sampled_from(["sn1", "sn2", "sn3", "sn4"]), min_size=0, max_size=3, unique=True),
    mode=st.sampled_from(["include", "exclude", "counts"]),
    num_nodes=st.integers(-1, 4),
    num_gpus=st.integers(-1, 4),
)
def test_flags_match_deepspeed_wherever_it_accepts_the_filter(
    hosts: list[str], slots: int, pick: list[str], mode: str, num_nodes: int, num_gpus: int
) -> None:
    pool = dict.fromkeys(hosts, slots)
    chosen = [h for h in pick if h in pool]
    include = "@".join(chosen) if mode == "include" else ""
    exclude = "@".join(chosen) if mode == "exclude" else ""
    nn, ng = (num_nodes, num_gpus) if mode == "counts" else (-1, -1)
    if (include == "" and mode == "include") or (exclude == "" and mode == "exclude"):
        return
    if (exclude and set(chosen) == set(pool)) or nn == 0 or ng == 0 or nn > len(pool) or ng > slots:
        return  # DeepSpeed runs with no host or no slot left, or pads; dslaunch refuses those (README)
    want = ds_flags(pool, include, exclude, nn, ng)
    if want is None:
        return
    assert our_flags(pool, include, exclude, nn, ng) == want


def test_slurm_per_node_counts() -> None:
    assert per_node_counts("2(x3),1", 4) == [2, 2, 2, 1]
    assert per_node_counts("4", 1) == [4]
    with pytest.raises(UserError, match="is for 2 node"):
        per_node_counts("1(x2)", 3)


def test_slurm_is_chosen_inside_an_allocation_without_a_hostfile() -> None:
    local = [Node("localhost", 1)]
    assert choose_launcher("auto", None, {"SLURM_JOB_ID": "7"}, None) == "slurm"
    assert choose_launcher("auto", "hosts", {"SLURM_JOB_ID": "7"}, [Node("a", 1)]) == "ssh"
    assert choose_launcher("auto", None, {}, local) == "local"
    assert choose_launcher("ssh", None, {"SLURM_JOB_ID": "7"}, local) == "ssh"
