"""Pre-flight's model comparison: every node's copy of `--model` against the launch host's.

A copy that differs would fail late, or worse, serve different weights on different ranks; so a
mismatch stops `up` before anything starts, one line per node naming the file.
"""

from __future__ import annotations

import os
from typing import Any

from dslaunch.wire.filehash import differences, manifest


def node_path(model: str) -> str:
    """Where the nodes hold the model: `~` is each node's own home; else this host's absolute path."""
    return model if model.startswith("~") else os.path.abspath(model)


def local_manifest(model: str | None) -> dict[str, dict[str, Any]] | None:
    """The launch host's hashes when `--model` is a directory here, else None (nothing to compare)."""
    if not model or not os.path.isdir(os.path.expanduser(model)):
        return None
    return manifest(os.path.expanduser(model))


Manifest = dict[str, dict[str, Any]]


def mismatch_line(host: str, model: str, want: Manifest, have: Manifest) -> str | None:
    """One line naming the node and the first file that differs, or None when the copies agree."""
    diff = differences(want, have)
    if not diff:
        return None
    rel, why = diff[0]
    more = f" (and {len(diff) - 1} more file(s))" if len(diff) > 1 else ""
    return (
        f"{host}: --model {node_path(model)}: {rel} is {why} there, unlike this host's copy{more}; "
        "copy it with 'dslaunch sync' or 'up --sync-model'"
    )
