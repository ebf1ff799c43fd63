"""Random combinations of `up` flags (valid and not): a plan, or one clear error; never a traceback.

`--dry-run` runs every check that needs no node, in-process, so hundreds of combinations are cheap.
"""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dslaunch.cli import main

SECONDS = ["0", "-1", "0.5", "10", "nan", "inf", "x"]
PORTS = ["0", "1", "7070", "29500", "65535", "65536", "-3", "x"]
VALUES: dict[str, list[str]] = {
    "--init-method": ["tcp", "file", "env", "mpi"],
    "--rdzv-dir": ["/shared/rdzv", "relative/dir", ""],
    "--master-port": PORTS,
    "--rdzv-port": PORTS,
    "--master-addr": ["10.0.0.1", "node0"],
    "--max-restarts": ["-1", "0", "3", "x"],
    "--restart-backoff": ["-1", "0", "1", "61", "nan"],
    "--restart-window": ["-1", "0", "600", "inf", "x"],
    "--backend": ["auto", "nccl", "gloo", "mpi"],
    "--timeout": SECONDS,
    "--connect-timeout": SECONDS,
    "--command-timeout": SECONDS,
    "--pg-timeout": SECONDS,
    "--parallelism": ["0", "1", "64"],
    "--env": ["A=1", "NOEQ", "1BAD=x", "=x"],
    "--name": ["ok", "no/slash", "-x", "", "a" * 70],
    "--include": ["a", "b", "a:0", "a:9", "a:0@b:1", "a:0@a", "@@", ""],
    "--exclude": ["a", "b:0", "c"],
    "--num-nodes": ["0", "1", "5", "-1"],
    "--num-gpus": ["0", "1", "5"],
    "--num_gpus": ["1", "x"],
    "--master_port": ["29500", "0"],
    "--task": ["generate", "embed", "translate"],
    "--dtype": ["auto", "fp16", "bf16", "fp32", "int3"],
    "--handler": ["mod:Cls", "pkg.sub:Handler", "bad", "a:b:c"],
    "--bind": ["127.0.0.1", "0.0.0.0", "::1", "localhost"],
    "--port": PORTS,
    "--max-batch-size": ["0", "1", "8"],
    "--max-batch-tokens": ["0", "1", "2", "4096"],
    "--max-step-tokens": ["0", "1", "7", "512"],
    "--max-itl-ratio": ["0", "0.5", "1", "2.5", "nan", "inf", "x"],
    "--batch-wait-ms": ["-1", "0", "5"],
    "--max-queue": ["0", "64"],
    "--max-request-bytes": ["10", "4096"],
    "--max-new-tokens": ["0", "16"],
    "--heartbeat": ["0", "1", "5"],
    "--hang-timeout": ["0", "3", "10", "120", "-5"],
    "--request-timeout": ["0", "30"],
    "--idle-timeout": ["0", "30"],
    "--token-file": ["/nonexistent/token"],
}
FLAGS = ["--shm-allreduce", "--kernel-inject", "--keep-logs", "--accept-new-host-keys", "--no-launch-dir",
         "--skip-model-check"]  # fmt: skip


@st.composite
def argv(draw: st.DrawFn) -> list[str]:
    out: list[str] = []
    for flag in draw(st.lists(st.sampled_from(sorted(VALUES)), min_size=1, max_size=6, unique=True)):
        out += [flag, draw(st.sampled_from(VALUES[flag]))]
    out += draw(st.lists(st.sampled_from(FLAGS), max_size=2, unique=True))
    return out


SINGLE = [[flag, value] for flag, values in VALUES.items() for value in values] + [[f] for f in FLAGS]


def test_every_flag_value_alone_gives_a_plan_or_one_clear_error(tmp_path: Path) -> None:
    for args in SINGLE:
        _check(tmp_path, args)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=argv())
def test_any_flag_combination_gives_a_plan_or_one_clear_error(tmp_path: Path, args: list[str]) -> None:
    _check(tmp_path, args)


def _check(tmp_path: Path, args: list[str]) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("a slots=2\nb slots=2\n")
    res = CliRunner().invoke(main, ["up", "--hostfile", str(hosts), *args, "--dry-run"], env={"DSLAUNCH_TOKEN": ""})
    assert res.exception is None or isinstance(res.exception, SystemExit), (args, res.exception)
    if res.exit_code == 0:
        assert "world size" in res.stdout or "rank" in res.stdout, (args, res.stdout)
        return
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, (args, res.stderr)
    if res.exit_code == 1:  # dslaunch's own check: exactly one line, naming the flag or the file
        assert res.stderr.strip() == errors[0], (args, res.stderr)
        assert "--" in errors[0] or "hosts" in errors[0] or "token" in errors[0], (args, errors[0])
    else:  # click's usage errors: usage, hint and the one error line
        assert res.exit_code == 2, (args, res.exit_code, res.stderr)
