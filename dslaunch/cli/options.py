"""Every flag of `up`, with its default read from the dataclass that owns it (JobSpec, ServeSpec)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

import click

from dslaunch.launch.spec import BACKENDS, RANK_STARTS, JobSpec
from dslaunch.transport.launchers import LAUNCHERS
from dslaunch.wire.initmethods import INIT_METHODS
from dslaunch.wire.serve import DTYPES, TASKS, ServeSpec


def _default(cls: type, name: str) -> Any:
    f = {f.name: f for f in fields(cls)}[name]
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def _job(name: str) -> Any:
    return _default(JobSpec, name)


def _serve(name: str) -> Any:
    return _default(ServeSpec, name)


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 10**3, "KIB": 1 << 10, "M": 1 << 20, "MB": 10**6, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 10**9, "GIB": 1 << 30, "T": 1 << 40, "TB": 10**12, "TIB": 1 << 40}  # fmt: skip


class Size(click.ParamType):
    """A memory size: bytes, or a number with a unit (512MiB, 4GiB, 1.5GB)."""

    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).upper() if m else ""
        if m is None or unit not in _UNITS:
            self.fail(f"{value!r} is not a size (bytes, or a number with a unit: 512MiB, 4GiB, 1.5GB)", param, ctx)
        return int(float(m.group(1)) * _UNITS[unit])


UP_EXAMPLES = """
\b
Examples:
  dslaunch up                                       # localhost, 1 rank, no sshd needed
  dslaunch up --hostfile hostfiles/localhost        # localhost, 2 ranks
  dslaunch up -H hosts --init-method tcp            # every node of the hostfile
  dslaunch up -H hosts --init-method file --rdzv-dir /nfs/rdzv
  dslaunch up -H hosts --include 'node1:0,1@node2' --name small
  dslaunch up -H hosts --tp 2                       # replicas of 2 ranks behind one front
  dslaunch up -H hosts --dry-run                    # print the plan, touch nothing
"""


UP_OPTIONS = [
    click.option(
        "--hostfile",
        "-H",
        type=click.Path(dir_okay=False),
        default=None,
        help="DeepSpeed-style hostfile ('host slots=N' per line). Default: localhost, 1 slot.",
    ),
    click.option("--include", "-i", default=None, help="Only these hosts/slots, e.g. 'node1:0,2@node2'."),
    click.option("--exclude", "-e", default=None, help="Leave out these hosts/slots (same syntax)."),
    click.option("--num-nodes", "--num_nodes", type=int, default=None, help="Use only the first N nodes."),
    click.option(
        "--num-gpus",
        "--num_gpus",
        type=int,
        default=None,
        help="Use only the first N slots of each node. Without a hostfile: localhost, one slot per GPU.",
    ),
    click.option(
        "--init-method",
        default=_job("init_method"),
        show_default=True,
        metavar=f"[{'|'.join(INIT_METHODS)}]",  # checked by JobSpec against the registry (wire/initmethods)
        help="How workers form their process group.",
    ),
    click.option(
        "--launcher",
        default="auto",
        show_default=True,
        metavar=f"[auto|{'|'.join(LAUNCHERS)}]",  # checked by JobSpec against the registry (transport/launchers)
        help="How the job's processes reach the nodes. auto: slurm inside a Slurm allocation without "
        "--hostfile, local for this machine alone, else ssh.",
    ),
    click.option("--partition", default=None, help="Slurm partition, when 'up' submits the job (no allocation)."),
    click.option("--time", "time_limit", default=None, help="Slurm time limit of a job 'up' submits (sbatch --time)."),
    click.option("--account", default=None, help="Slurm account charged for a job 'up' submits."),
    click.option("--rdzv-dir", default=None, help="Directory shared by every node (NFS), for --init-method file."),
    click.option(
        "--master-addr",
        "--master_addr",
        default=None,
        help="Address the other nodes use to reach node 0. Default: the one SSH reached, or node 0's own answer.",
    ),
    click.option(
        "--master-port",
        "--master_port",
        type=int,
        default=None,
        help="Process-group port on node 0. Default: a free one.",
    ),
    click.option(
        "--rdzv-port", type=int, default=None, help="torchrun rendezvous port on node 0. Default: a free one."
    ),
    click.option(
        "--tp",
        type=int,
        default=None,
        help="Ranks per replica (tensor-parallel degree). World size / TP replicas serve behind one front, "
        "each restarting on its own. Default: every rank in one replica.",
    ),
    click.option(
        "--routers",
        type=int,
        default=None,
        help="Routers (public fronts), on nodes 0, 1, ...; each serves every replica, and clients fail over "
        "between them. Default: 2 when the job has two nodes or more, else 1.",
    ),
    click.option(
        "--max-restarts",
        type=int,
        default=_job("max_restarts"),
        show_default=True,
        help="Gang restarts before the job is declared failed.",
    ),
    click.option(
        "--restart-backoff",
        type=float,
        default=_job("restart_backoff"),
        show_default=True,
        help="Seconds before the 2nd restart, doubling for each later one (the 1st is immediate).",
    ),
    click.option(
        "--restart-window",
        type=float,
        default=_job("restart_window"),
        show_default=True,
        help="Seconds a replica must run after a restart to get its whole --max-restarts (and back-off) "
        "again, so that a long-lived job rides out rare faults. 0: one budget for the job's lifetime.",
    ),
    click.option(
        "--rank-start",
        type=click.Choice(RANK_STARTS),
        default=_job("rank_start"),
        show_default=True,
        help="How the agent starts each rank: 'fork' from the agent, which has imported torch, transformers "
        "and DeepSpeed once (a restart then costs a model load; on a node with a GPU it is 'exec'), or "
        "'exec' a new interpreter per rank, as plain torchrun.",
    ),
    click.option(
        "--backend",
        type=click.Choice(BACKENDS),
        default=_job("backend"),
        show_default=True,
        help="auto: nccl when every node has a GPU per slot, else gloo.",
    ),
    click.option(
        "--python",
        default=_job("python"),
        show_default=True,
        help="Python interpreter on the nodes (with dslaunch and torch installed).",
    ),
    click.option(
        "--work-dir",
        default=_job("work_dir"),
        show_default=True,
        help="Where each node keeps the job's logs and status files.",
    ),
    click.option(
        "--no-launch-dir",
        is_flag=True,
        help="Do not run the ranks in the current directory, first on PYTHONPATH (DeepSpeed does; "
        "dslaunch too, on nodes where that directory exists).",
    ),
    click.option("--env", "env_pairs", multiple=True, metavar="KEY=VAL", help="Set on every node (repeatable)."),
    click.option("--env-file", multiple=True, type=click.Path(dir_okay=False), help="KEY=VAL file (repeatable)."),
    click.option(
        "--timeout",
        type=float,
        default=_job("ready_timeout"),
        show_default=True,
        help="Seconds to wait for every rank to be ready.",
    ),
    click.option(
        "--connect-timeout",
        type=float,
        default=_job("connect_timeout"),
        show_default=True,
        help="SSH connect time-out.",
    ),
    click.option(
        "--command-timeout",
        type=float,
        default=_job("command_timeout"),
        show_default=True,
        help="Time-out for each command run on a node.",
    ),
    click.option(
        "--pg-timeout",
        type=float,
        default=_job("pg_timeout"),
        show_default=True,
        help="Collective time-out of the process group.",
    ),
    click.option(
        "--accept-new-host-keys",
        is_flag=True,
        help="Record unknown SSH host keys (like OpenSSH accept-new); changed keys are refused.",
    ),
    click.option(
        "--parallelism", type=int, default=_job("parallelism"), show_default=True, help="Nodes contacted at once."
    ),
    click.option("--keep-logs", is_flag=True, help="Keep the nodes' logs after 'down'."),
    click.option("--dry-run", is_flag=True, help="Print the launch plan and exit without touching a node."),
    click.option(
        "--sync-model",
        is_flag=True,
        help="First copy --model (a directory here) to every node that lacks it or holds another copy "
        "(as 'dslaunch sync' does).",
    ),
]


SERVE_OPTIONS = [
    click.option("--model", "-m", default=None,
                 help="Model directory on every node (or a hub name). Default: a tiny model built locally."),
    click.option("--task", type=click.Choice(TASKS), default=_serve("task"), show_default=True,
                 help="generate: causal LM, prompts to text. embed: encoder, texts to vectors."),
    click.option("--dtype", type=click.Choice(DTYPES), default=_serve("dtype"), show_default=True,
                 help="auto: fp32 on CPU, the model's own half precision on GPU."),
    click.option("--kernel-inject", is_flag=True, help="DeepSpeed's fused GPU kernels instead of AutoTP."),
    click.option("--whole-checkpoint", is_flag=True,
                 help="Every rank reads the whole checkpoint (from_pretrained), instead of only the slices of "
                      "the safetensors files its shard holds."),
    click.option("--skip-model-check", is_flag=True,
                 help="Start even where pre-flight knows DeepSpeed's AutoTP shards this model family wrongly "
                      "(a newer DeepSpeed may not); every rank still runs one forward before ready."),
    click.option("--handler", default=None, metavar="MODULE:CLASS",
                 help="Your own model code: load(ctx) and __call__(batch); importable on every node."),
    click.option("--shm-allreduce", is_flag=True,
                 help="DeepSpeed's shared-memory CPU all-reduce (one node only; built on first use)."),
    click.option("--bind", default=_serve("bind"), show_default=True,
                 help="Front address on node 0; anything but loopback requires a token."),
    click.option("--port", type=int, default=None, help="Front port. Default: 7070 or the next free one."),
    click.option("--token-file", type=click.Path(dir_okay=False), default=None,
                 help="File holding the front's token (or set DSLAUNCH_TOKEN). Generated off loopback."),
    click.option("--max-batch-size", type=int, default=_serve("max_batch_size"), show_default=True,
                 help="Most rows (prompts) in one forward batch."),
    click.option("--max-batch-tokens", type=int, default=_serve("max_batch_tokens"), show_default=True,
                 help="KV cache size in tokens: the block pool of models whose attention is paged (rows "
                      "hold the blocks they use), or the bound of the padded cache (rows x the longest row's "
                      "prompt + max_new_tokens); requests beyond it wait in the queue."),
    click.option("--kv-cache-memory", type=Size(), default=None,
                 help="The KV block pool's size per rank in memory (e.g. 4GiB), instead of --max-batch-tokens. "
                      "Default: --max-batch-tokens on CPU; on a GPU, what 90% of its memory leaves after the "
                      "weights and one step's activations. The rank's log and `status` show the pool."),
    click.option("--max-step-tokens", type=int, default=_serve("max_step_tokens"), show_default=True,
                 help="Most tokens one forward pass computes (paged models): every running row's next token, "
                      "then chunks of joining prompts; a longer prompt is prefilled over several steps."),
    click.option("--max-itl-ratio", type=float, default=_serve("max_itl_ratio"), show_default=True,
                 help="While rows decode, a step carrying prompt chunks takes at most this many times a "
                      "decode-only step (fitted from measured step times; paged models). 0: only "
                      "--max-step-tokens bounds it."),
    click.option("--batch-wait-ms", type=float, default=_serve("batch_wait_ms"), show_default=True,
                 help="How long the first request of a batch waits for company."),
    click.option("--max-queue", type=int, default=_serve("max_queue"), show_default=True,
                 help="Queued requests beyond which new ones get 'overloaded'."),
    click.option("--max-request-bytes", type=int, default=_serve("max_request_bytes"), show_default=True,
                 help="Longest request line accepted."),
    click.option("--request-timeout", type=float, default=_serve("request_timeout"), show_default=True,
                 help="Default per-request time-out (a request may ask for less or more)."),
    click.option("--idle-timeout", type=float, default=_serve("idle_timeout"), show_default=True,
                 help="Seconds a client connection may stay silent with nothing in flight."),
    click.option("--max-connections", type=int, default=_serve("max_connections"), show_default=True,
                 help="Open client connections beyond which new ones get 'overloaded' (HTTP 429)."),
    click.option("--max-inflight", type=int, default=_serve("max_inflight"), show_default=True,
                 help="Requests one connection may have running at once; reading pauses at the cap."),
    click.option("--write-timeout", type=float, default=_serve("write_timeout"), show_default=True,
                 help="Seconds a client may take to read an answer before it is cut off."),
    click.option("--served-model-name", default=None,
                 help="Model id of the OpenAI-compatible API. Default: the model directory's name."),
    click.option("--max-new-tokens", type=int, default=_serve("max_new_tokens"), show_default=True,
                 help="Most tokens one prompt may ask for."),
    click.option("--heartbeat", "heartbeat_s", type=float, default=_serve("heartbeat_s"), show_default=True,
                 help="Seconds between rank 0's idle heartbeats to the other ranks."),
    click.option("--hang-timeout", type=float, default=_serve("hang_timeout"), show_default=True,
                 help="Seconds a serving rank may go without progress before the job restarts (0: never)."),
]  # fmt: skip


def apply(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """A decorator applying click options in the order listed (as `--help` shows them)."""

    def deco(f: Any) -> Any:
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


def name_option(f: Any) -> Any:
    return click.option("--name", "-n", default=_job("name"), show_default=True, help="Job name.")(f)


GRACE_DEFAULT = _job("stop_grace")
QUERY_TIMEOUT_DEFAULT = _serve("request_timeout")
