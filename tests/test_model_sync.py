"""Getting the model to the nodes: the hash pre-flight and `dslaunch sync`, over real sshd nodes.

Every node sees the model directory (and a small one for the disk-full case) as a tmpfs of its
own, so each holds its own copy at the launch host's path, as separate machines would.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dslaunch.errors import RemoteError, UserError
from dslaunch.launch.modelsync import NodeSync, sync_model
from dslaunch.launch.preflight import connect_options, preflight
from dslaunch.launch.spec import JobSpec
from dslaunch.transport.nodes import Cluster
from dslaunch.wire.filehash import PART_SUFFIX, manifest
from dslaunch.wire.hosts import Node
from tests.conftest import Cli, sim_nodes
from tests.simnodes import SimCluster

pytestmark = pytest.mark.ssh
BIG = 3 << 20  # the "weights": big enough for several chunks, small enough to be cheap


def _write_model(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (d / "model.safetensors").write_bytes(os.urandom(BIG))
    (d / "sub").mkdir(exist_ok=True)
    (d / "sub" / "tokenizer.json").write_text("{}" * 1000)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimCluster, Path, Path]]:
    tmp = tmp_path_factory.mktemp("modelsync")
    model, small = tmp / "model", tmp / "small"
    _write_model(model)
    _write_model(small)
    private = {0: [str(model), str(small)], 1: [str(model), str(small)]}
    with (
        sim_nodes(tmp, 2, private_dirs=private, private_sizes={str(small): "2m"}) as sim,
        pytest.MonkeyPatch.context() as mp,
    ):
        for k, v in sim.env().items():
            mp.setenv(k, v)
        mp.delenv("SSH_AUTH_SOCK", raising=False)
        yield sim, model, small


def _cluster(sim: SimCluster) -> Cluster:
    spec = JobSpec(nodes=[Node(n.alias, 1) for n in sim.nodes], python=sys.executable)
    return Cluster(spec.nodes, connect_options(spec), spec.python)


def _sh(cluster: Cluster, i: int, script: str) -> str:
    res = cluster.clients[i].transport.run(["sh", "-c", script])
    assert res.code == 0, res.stderr
    return res.stdout


def _wipe(cluster: Cluster, d: Path) -> None:
    for i in range(len(cluster.clients)):
        _sh(cluster, i, f"rm -rf {d}/* {d}/.[!.]*; true")


def _node_manifest(cluster: Cluster, i: int, d: Path) -> dict[str, object]:
    return cluster.clients[i].call("model-hashes", {"dir": str(d)})


def _by_host(results: list[NodeSync]) -> dict[str, NodeSync]:
    return {r.host: r for r in results}


def test_fresh_identical_and_corrupted_copies(world: tuple[SimCluster, Path, Path]) -> None:
    sim, model, _ = world
    want = manifest(model)
    total = sum(int(f["size"]) for f in want.values())
    with _cluster(sim) as cluster:
        _wipe(cluster, model)
        assert not _node_manifest(cluster, 1, model)["files"]  # each node's copy really is its own
        fresh = _by_host(sync_model(cluster, str(model)))
        assert all(r.bytes_sent == total and sorted(r.files) == sorted(want) for r in fresh.values())
        for i in (0, 1):
            assert _node_manifest(cluster, i, model)["files"] == want

        again = sync_model(cluster, str(model))
        assert all(r.identical and r.bytes_sent == 0 for r in again)

        _sh(cluster, 1, f"printf XXXX | dd of={model}/model.safetensors bs=1 seek=1000 conv=notrunc 2>/dev/null")
        fixed = _by_host(sync_model(cluster, str(model)))
        assert fixed["node0"].bytes_sent == 0
        assert fixed["node1"].files == ["model.safetensors"] and fixed["node1"].bytes_sent == BIG
        assert _node_manifest(cluster, 1, model)["files"] == want


class Interrupted(Exception):
    pass


class CutAfter:
    """SyncEvents that fail node1's copy after its first chunk, as a Ctrl-C or a dropped link would."""

    def __init__(self) -> None:
        self.seen = 0

    def planned(self, host: str, total: int, files: int) -> None:
        pass

    def sent(self, host: str, n: int) -> None:
        if host == "node1":
            self.seen += n
            if self.seen > 1 << 20:  # inside the weights file, after its first chunk
                raise Interrupted("cut")


def test_an_interrupted_copy_resumes_and_is_verified(world: tuple[SimCluster, Path, Path]) -> None:
    sim, model, _ = world
    want = manifest(model)
    with _cluster(sim) as cluster:
        _wipe(cluster, model)
        with pytest.raises(RemoteError, match="node1: cut"):
            sync_model(cluster, str(model), CutAfter())
        left = _node_manifest(cluster, 1, model)
        assert 0 < left["parts"]["model.safetensors"] < BIG
        assert "model.safetensors" not in left["files"]  # the partial copy does not carry the file's name
        assert f"model.safetensors{PART_SUFFIX}" in _sh(cluster, 1, f"ls -a {model}")

        resumed = _by_host(sync_model(cluster, str(model)))["node1"]
        total = sum(int(f["size"]) for f in want.values())
        part_bytes = sum(left["parts"].values())
        assert resumed.resumed == part_bytes and resumed.bytes_sent == total - part_bytes
        after = _node_manifest(cluster, 1, model)
        assert after["files"] == want and not after["parts"]


def test_a_corrupt_part_file_is_sent_again_whole(world: tuple[SimCluster, Path, Path]) -> None:
    """A part file whose bytes are wrong fails the hash at the end and is replaced, not trusted."""
    sim, model, _ = world
    want = manifest(model)
    with _cluster(sim) as cluster:
        _wipe(cluster, model)
        _sh(cluster, 1, f"head -c 4096 /dev/zero > {model}/model.safetensors{PART_SUFFIX}")
        r = _by_host(sync_model(cluster, str(model)))["node1"]
        assert "model.safetensors" in r.files
        assert _node_manifest(cluster, 1, model)["files"] == want


def test_a_node_without_disk_space_is_named_and_left_without_a_complete_looking_file(
    world: tuple[SimCluster, Path, Path],
) -> None:
    sim, _, small = world  # `small` is a 2 MB tmpfs on each node; the model is over 3 MB
    with _cluster(sim) as cluster:
        _wipe(cluster, small)
        with pytest.raises(RemoteError) as e:
            sync_model(cluster, str(small))
        lines = str(e.value).splitlines()[1:]
        assert len(lines) == 2 and all("not enough disk space" in line for line in lines)
        assert lines[0].strip().startswith("node0:") and lines[1].strip().startswith("node1:")
        for i in (0, 1):
            assert _sh(cluster, i, f"ls -A {small}").strip() == ""


def _spec(sim: SimCluster, model: Path, tmp_path: Path) -> JobSpec:
    from dslaunch.wire.serve import ServeSpec

    return JobSpec(
        nodes=[Node(n.alias, 1) for n in sim.nodes], python=sys.executable, work_dir=str(tmp_path / "work"),
        serve=ServeSpec(model=str(model)),
    )  # fmt: skip


def test_preflight_passes_identical_copies_and_names_a_corrupted_file(
    world: tuple[SimCluster, Path, Path], tmp_path: Path
) -> None:
    sim, model, _ = world
    spec = _spec(sim, model, tmp_path)
    with Cluster(spec.nodes, connect_options(spec), spec.python) as cluster:
        _wipe(cluster, model)
        sync_model(cluster, str(model))
        preflight(spec, cluster)  # identical copies: no complaint

        _sh(cluster, 1, f"printf XXXX | dd of={model}/model.safetensors bs=1 seek=7 conv=notrunc 2>/dev/null")
        _sh(cluster, 0, f"rm {model}/sub/tokenizer.json")
        with pytest.raises(UserError) as e:
            preflight(spec, cluster)
    msg = str(e.value)
    assert f"node1: --model {model}: model.safetensors is different content there" in msg
    assert f"node0: --model {model}: sub/tokenizer.json is missing there" in msg
    assert len([line for line in msg.splitlines() if "--model" in line]) == 2


def test_cli_sync_prints_plain_lines_when_not_a_terminal(world: tuple[SimCluster, Path, Path]) -> None:
    sim, model, _ = world
    with _cluster(sim) as cluster:
        _wipe(cluster, model)
    cli = Cli(sim.env(), model.parent)
    res = cli("sync", "-H", str(sim.hostfile(slots=1)), "--model", str(model))
    assert res.returncode == 0, res.stderr
    assert "node1: 3 file(s), 3.1 MB to send" in res.stderr
    assert "node1: 3 file(s) copied, 3.1 MB sent" in res.stderr
    again = cli("sync", "-H", str(sim.hostfile(slots=1)), "--model", str(model))
    assert again.returncode == 0, again.stderr
    assert "node0: identical, nothing sent" in again.stderr
    assert "every node already holds this model: no copy needed" in again.stderr
    assert "\x1b[" not in again.stderr


def test_hashes_are_cached_by_path_size_and_mtime_and_shared_safely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dslaunch.wire import filehash

    d = tmp_path / "m"
    _write_model(d)
    cache = tmp_path / "cache" / "hashes.json"
    first = filehash.manifest(d, cache=cache)
    assert first["model.safetensors"]["sha256"] == hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()

    def no_rehash(*a: object, **k: object) -> str:
        raise AssertionError("rehashed a file the cache knows")

    other = tmp_path / "other"  # a second directory (or node) sharing the cache file keeps both
    _write_model(other)
    second = filehash.manifest(other, cache=cache)
    (tmp_path / "solo").mkdir()
    copied = tmp_path / "solo" / "copied.bin"  # a file sync verified and renamed: remembered, not rehashed
    copied.write_bytes(b"weights")
    filehash.remember(copied, hashlib.sha256(b"weights").hexdigest(), cache=cache)
    monkeypatch.setattr(filehash, "hash_file", no_rehash)
    assert filehash.manifest(d, cache=cache) == first and filehash.manifest(other, cache=cache) == second
    assert filehash.manifest(tmp_path / "solo", cache=cache)["copied.bin"]["size"] == 7
    monkeypatch.undo()
    (d / "config.json").write_text("{}")  # new size and mtime: hashed again
    assert filehash.manifest(d, cache=cache)["config.json"]["sha256"] == hashlib.sha256(b"{}").hexdigest()


def test_up_sync_model_copies_before_preflight(world: tuple[SimCluster, Path, Path], tmp_path: Path) -> None:
    """`up --sync-model` copies first, so pre-flight finds identical copies (and stops here on a work
    directory it cannot create, before anything starts: cheap, and proof of the order)."""
    sim, model, _ = world
    want = manifest(model)
    with _cluster(sim) as cluster:
        _wipe(cluster, model)
        _sh(cluster, 1, f"head -c 100 /dev/zero > {model}/config.json")  # one wrong file on node1
    cli = Cli(sim.env(), tmp_path)
    res = cli.up("-H", str(sim.hostfile(slots=1)), "--model", str(model), "--sync-model", "--work-dir", "/proc/no")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "node0: 3 file(s) copied" in res.stderr and "node1: 3 file(s) copied" in res.stderr
    assert "cannot create the work directory" in res.stderr and "--model" not in res.stderr.split("pre-flight")[-1]
    with _cluster(sim) as cluster:
        assert all(_node_manifest(cluster, i, model)["files"] == want for i in (0, 1))


def test_tree_fan_out_a_node_that_holds_the_model_passes_it_on(tmp_path: Path) -> None:
    """Three nodes: this host sends to node0, then to node1 while node0 sends to node2 directly."""
    model = tmp_path / "model"
    _write_model(model)
    want = manifest(model)
    private = {i: [str(model)] for i in range(3)}
    with sim_nodes(tmp_path, 3, private_dirs=private, first_ip=20) as sim, pytest.MonkeyPatch.context() as mp:
        for k, v in sim.env().items():
            mp.setenv(k, v)
        mp.delenv("SSH_AUTH_SOCK", raising=False)
        spec = JobSpec(nodes=[Node(n.alias, 1) for n in sim.nodes], python=sys.executable)
        with Cluster(spec.nodes, connect_options(spec), spec.python) as cluster:
            got = _by_host(sync_model(cluster, str(model), tree_from=3))
            assert [got[h].source for h in ("node0", "node1", "node2")] == ["", "", "node0"]
            total = sum(int(f["size"]) for f in want.values())
            assert got["node2"].bytes_sent == total and sorted(got["node2"].files) == sorted(want)
            for i in range(3):
                assert _node_manifest(cluster, i, model)["files"] == want
            again = sync_model(cluster, str(model), tree_from=3)
            assert all(r.identical for r in again)


def test_a_relay_connection_without_the_token_is_refused(tmp_path: Path) -> None:
    import socket
    import threading

    from dslaunch.node.relay import receive

    lines = receive({"dir": str(tmp_path), "token": "right", "files": {"a": "0" * 64}, "bind": "127.0.0.1"})
    port = json.loads(next(lines))["port"]

    def intruder() -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"wrong\n" + json.dumps({"rel": "a", "offset": 0, "size": 3}).encode() + b"\nabc{}\n")

    t = threading.Thread(target=intruder)
    t.start()
    assert "without the sync's token was refused" in json.loads(next(lines))["error"]
    t.join()
    assert list(tmp_path.iterdir()) == []


def test_summary_says_when_no_copy_is_needed_and_names_a_shared_filesystem_under_slurm() -> None:
    from dslaunch.cli.sync import summary

    same = [NodeSync("n1"), NodeSync("n2")]
    assert summary(same, "slurm")[-1] == "every node already holds this model (a shared filesystem): no copy needed"
    assert summary(same, "ssh")[-1] == "every node already holds this model: no copy needed"
    mixed = summary([NodeSync("n1", ["w.safetensors"], 5_000_000, 1_000_000), NodeSync("n2")], "slurm")
    assert mixed == ["n1: 1 file(s) copied, 5.0 MB sent, 1.0 MB continued from an interrupted copy",
                     "n2: identical, nothing sent"]  # fmt: skip
