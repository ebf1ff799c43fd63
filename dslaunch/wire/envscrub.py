"""Which variables of an inherited environment must not reach a job's processes.

Over SSH a job gets the node's login environment plus what the plan sets. On `localhost`
nodectl is a child of the CLI, so it would inherit the CLI's whole environment: the front's
token (`DSLAUNCH_TOKEN`) and whatever credentials the user's shell holds. Both paths drop
them, so a job's environment holds only what the plan put there on purpose (`--env`,
`--env-file`, the forwarded prefixes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# dslaunch's own variables belong to the CLI (DSLAUNCH_TOKEN, DSLAUNCH_HOME); a job's DSLAUNCH_*
# variables all come from its plan, never from whoever ran the command.
OWN_PREFIX = "DSLAUNCH_"

# Names that hold credentials by convention: GITHUB_TOKEN, AWS_SECRET_ACCESS_KEY, OPENAI_API_KEY,
# DB_PASSWORD, ... and the SSH agent, which lets a process log in wherever the user can.
_SECRET_RE = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIALS?|APIKEY|AUTH)(_|$)|_KEY$|^SSH_AUTH_SOCK$",
    re.IGNORECASE,
)


def looks_secret(name: str) -> bool:
    """True for a variable named like a credential."""
    return bool(_SECRET_RE.search(name))


def without_own(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without dslaunch's own variables (the node side: the node's login environment stays)."""
    return {k: v for k, v in env.items() if not k.startswith(OWN_PREFIX)}


def for_node_command(env: Mapping[str, str]) -> dict[str, str]:
    """The launch host's environment as a local node command may see it: no dslaunch variables,
    nothing named like a credential."""
    return {k: v for k, v in without_own(env).items() if not looks_secret(k)}
