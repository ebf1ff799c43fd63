"""The two seams: a launcher and an init method are each one class and one registration, and the
CLI (choices, validation, the plan, the dry run) picks them up without another change."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from dslaunch.cli import main
from dslaunch.errors import UserError
from dslaunch.transport.base import ConnectOptions, Transport
from dslaunch.transport.launchers import LAUNCHERS, DirectLauncher, get_launcher, register_launcher
from dslaunch.wire.hosts import Node
from dslaunch.wire.initmethods import INIT_METHODS, InitMethod, init_method, register_init_method


class CarrierPigeon(DirectLauncher):
    """A launcher that reaches nodes by pigeon: only its name and what it describes are its own."""

    name = "pigeon"

    def connect(self, node: Node, opts: ConnectOptions) -> Transport:
        raise AssertionError("a dry run contacts no node")

    def describe(self) -> list[tuple[str, str]]:
        return [("launcher", "pigeon"), ("loft", self.meta.get("loft", "north"))]


class StoreInit(InitMethod):
    """A made-up init method with a URL of its own and a flag rule of its own."""

    name = "store"
    uses_master_port = False

    def url(self, gang: str, master_addr: str, master_port: int, rdzv_dir: str | None) -> str:
        return f"store://{master_addr}/{gang}"


@pytest.fixture
def registered() -> Iterator[None]:
    register_launcher("pigeon", CarrierPigeon)
    register_init_method(StoreInit())
    try:
        yield
    finally:
        LAUNCHERS.pop("pigeon")
        INIT_METHODS.pop("store")


def _dry_run(*args: str) -> Any:
    return CliRunner().invoke(main, ["up", "--dry-run", *args], env={"DSLAUNCH_TOKEN": "", "SLURM_JOB_ID": ""})


def test_dry_run_shows_a_registered_launcher_and_init_method(registered: None) -> None:
    res = _dry_run("--launcher", "pigeon", "--init-method", "store")
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "launcher pigeon" in out and "loft north" in out
    assert "init method store store://127.0.0.1/default-dryrun00" in out


def test_builtin_registries_keep_their_three_methods_and_launchers() -> None:
    assert list(INIT_METHODS) == ["tcp", "file", "env"]
    assert {"local", "ssh", "slurm"} <= set(LAUNCHERS)
    assert init_method("file").uses_master_port is False and init_method("tcp").uses_master_port
    with pytest.raises(UserError, match="--init-method 'mpi': choose one of tcp, file, env"):
        init_method("mpi")
    with pytest.raises(UserError, match="--launcher local runs on this machine only, not on node7"):
        get_launcher("local").connect(Node("node7", 1), ConnectOptions())


def test_dry_run_names_the_launcher_it_chose() -> None:
    res = _dry_run()
    assert res.exit_code == 0, res.output
    assert "launcher local" in " ".join(res.output.split())
    # Slurm's submission flags mean nothing to another launcher: refused, naming them
    res = _dry_run("--partition", "gpu")
    assert res.exit_code == 1 and "--partition, --time and --account are for a job 'up' submits" in res.output
