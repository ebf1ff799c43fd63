"""DeepSpeed-compatible hostfiles and the `--include/--exclude/--num-nodes/--num-gpus` filters.

A hostfile has one node per line: ``[user@]host [slots=N]``; ``#`` starts a comment (whole line
or trailing), blank lines are ignored, and a missing ``slots=`` means one slot. Every error names
the file and line (or the flag) so it can be fixed without reading a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path

from dslaunch.errors import HostfileError
from dslaunch.wire.hosts import Node

_HOST_RE = re.compile(r"^(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@)?(?P<host>[A-Za-z0-9._:\[\]-]+)$")


def parse_hostfile_text(text: str, source: str = "<hostfile>") -> list[Node]:
    """Parse hostfile text; raise HostfileError naming ``source`` and the line on any problem."""
    nodes: list[Node] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        words = line.split()
        m = _HOST_RE.match(words[0])
        if m is None or "=" in words[0]:
            raise HostfileError(f"{where}: {words[0]!r} is not a host name (expected '[user@]host slots=N')")
        slots = 1
        slots_given = False
        for word in words[1:]:
            key, sep, value = word.partition("=")
            if not sep:
                raise HostfileError(f"{where}: unexpected {word!r} (expected 'slots=N')")
            if key == "max_slots":  # DeepSpeed accepts it and ignores it (an MPI notion); so do we
                if not value.isascii() or not value.isdigit():
                    raise HostfileError(f"{where}: max_slots={value!r} is not a whole number")
                continue
            if key != "slots":
                raise HostfileError(f"{where}: unknown key {key!r} (only 'slots' and 'max_slots' are understood)")
            if slots_given:
                raise HostfileError(f"{where}: 'slots' given twice")
            if not value.isascii() or not value.isdigit():
                raise HostfileError(f"{where}: slots={value!r} is not a whole number")
            slots = int(value)
            slots_given = True
            if slots < 1:
                raise HostfileError(f"{where}: slots={value} must be at least 1")
            if slots > 1024:
                raise HostfileError(f"{where}: slots={value} is more than any machine has")
        host = m.group("host")
        if host in seen:
            raise HostfileError(f"{where}: host {host!r} is listed twice (first on line {seen[host]})")
        seen[host] = lineno
        nodes.append(Node(host=host, slots=slots, user=m.group("user"), line=lineno))
    if not nodes:
        raise HostfileError(f"{source}: no hosts in the hostfile")
    return nodes


def load_hostfile(path: str | Path) -> list[Node]:
    """Read and parse a hostfile from disk; a missing or unreadable file is a one-line error."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HostfileError(f"{p}: hostfile not found") from None
    except IsADirectoryError:
        raise HostfileError(f"{p}: is a directory, not a hostfile") from None
    except UnicodeDecodeError as e:
        raise HostfileError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise HostfileError(f"{p}: cannot read hostfile ({e.strerror})") from None
    return parse_hostfile_text(text, str(p))


def _parse_filter(spec: str, flag: str, nodes: list[Node]) -> dict[str, set[int] | None]:
    """Parse ``host1@host2:0,2`` into {host: slot set, or None for the whole host}.

    As in DeepSpeed, slots named for one host in several entries add up (``a:0@a:1`` is ``a:0,1``).
    A host named both whole and with slots (``a:0@a``) is refused: DeepSpeed silently reads it as
    the listed slots only, which is rarely what was meant, for --exclude least of all.
    """
    by_host = {n.host: n for n in nodes}
    whole: list[str] = []
    listed: dict[str, set[int]] = {}
    for part in spec.split("@"):
        part = part.strip()
        if not part:
            raise HostfileError(f"{flag} {spec!r}: empty host entry")
        host, sep, slots_s = part.partition(":")
        host = host.strip()
        if host not in by_host:
            known = ", ".join(by_host)
            raise HostfileError(f"{flag} {spec!r}: host {host!r} is not in the hostfile ({known})")
        if not sep:
            whole.append(host)
            continue
        ids = listed.setdefault(host, set())
        for s in slots_s.split(","):
            s = s.strip()
            if not s.isascii() or not s.isdigit():
                raise HostfileError(f"{flag} {spec!r}: slot {s!r} on {host!r} is not a whole number")
            i = int(s)
            if i >= by_host[host].slots:
                raise HostfileError(f"{flag} {spec!r}: host {host!r} has slots 0..{by_host[host].slots - 1}, not {i}")
            ids.add(i)
    for host in whole:
        if host in listed:
            ids_s = ",".join(map(str, sorted(listed[host])))
            raise HostfileError(
                f"{flag} {spec!r}: host {host!r} is named both whole and with slots {ids_s} (DeepSpeed would "
                f"take only slots {ids_s}); write {host!r} or '{host}:{ids_s}'"
            )
    out: dict[str, set[int] | None] = {h: None for h in whole}
    out.update(listed)
    return out


def select_nodes(
    nodes: list[Node],
    include: str | None = None,
    exclude: str | None = None,
    num_nodes: int | None = None,
    num_gpus: int | None = None,
) -> list[Node]:
    """Apply DeepSpeed-style filters; the result keeps hostfile order and is never empty."""
    if include and exclude:
        raise HostfileError("--include and --exclude cannot be used together")
    selected: list[Node] = []
    if include:
        rules = _parse_filter(include, "--include", nodes)
        for n in nodes:
            if n.host in rules:
                ids = rules[n.host]
                selected.append(_with_slots(n, sorted(ids) if ids is not None else n.slot_ids))
    elif exclude:
        rules = _parse_filter(exclude, "--exclude", nodes)
        for n in nodes:
            ids = rules.get(n.host, set())
            if ids is None:
                continue
            keep = [i for i in n.slot_ids if i not in ids]
            if keep:
                selected.append(_with_slots(n, keep))
    else:
        selected = list(nodes)
    if num_nodes is not None:
        if num_nodes < 1:
            raise HostfileError(f"--num-nodes {num_nodes}: must be at least 1")
        if num_nodes > len(selected):
            raise HostfileError(f"--num-nodes {num_nodes}: only {len(selected)} node(s) selected")
        selected = selected[:num_nodes]
    if num_gpus is not None:
        if num_gpus < 1:
            raise HostfileError(f"--num-gpus {num_gpus}: must be at least 1")
        for n in selected:
            if n.nprocs < num_gpus:
                raise HostfileError(f"--num-gpus {num_gpus}: host {n.host!r}{n.where} has only {n.nprocs} slot(s)")
        selected = [_with_slots(n, n.slot_ids[:num_gpus]) for n in selected]
    if not selected:
        raise HostfileError("the host filters leave no node to run on")
    return selected


def choose_nodes(
    hostfile: str | None,
    include: str | None = None,
    exclude: str | None = None,
    num_nodes: int | None = None,
    num_gpus: int | None = None,
    visible: str | None = None,
    gpus: int | None = None,
) -> tuple[list[Node], list[str]]:
    """The nodes `up` runs on: the hostfile's, or DeepSpeed's implicit localhost; plus notes."""
    notes: list[str] = []
    if hostfile:
        nodes = load_hostfile(hostfile)
    else:
        node, include, note = implicit_localhost(
            local_gpus() if gpus is None else gpus, visible, include, exclude, num_gpus
        )
        nodes = [node]
        notes += [note] if note else []
    return select_nodes(nodes, include, exclude, num_nodes, num_gpus), notes


def _with_slots(n: Node, ids: list[int] | tuple[int, ...]) -> Node:
    return Node(host=n.host, slots=n.slots, user=n.user, line=n.line, slot_ids=tuple(ids))


def local_gpus(dev: str | Path = "/dev") -> int:
    """NVIDIA GPUs on this machine, from their device files (fast: torch is not imported)."""
    return sum(1 for p in Path(dev).glob("nvidia[0-9]*") if p.name[len("nvidia") :].isdigit())


def implicit_localhost(
    gpus: int,
    visible: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    num_gpus: int | None = None,
) -> tuple[Node, str | None, str | None]:
    """The node DeepSpeed uses without a hostfile, and the include filter that goes with it.

    With GPUs: localhost with one slot per GPU; `CUDA_VISIBLE_DEVICES` picks the slots when no
    filter is given (DeepSpeed turns it into ``--include localhost:<ids>`` and so do we), and is
    ignored, with a note, when one is. Without GPUs: CPU ranks, as many as the filters ask for.
    Returns (node, include, note).
    """
    filters = include or exclude or num_gpus is not None
    if not gpus:
        wanted = [num_gpus or 1]
        for spec in (include, exclude):
            wanted += [int(d) + 1 for d in re.findall(r"\d+", spec or "")[:1024] if len(d) < 5]
        return Node("localhost", max(1, min(max(wanted), 1024))), include, None
    node = Node("localhost", gpus)
    if visible is None or not visible.strip():
        return node, include, None
    if filters:
        note = f"CUDA_VISIBLE_DEVICES={visible} is ignored: --include/--exclude/--num-gpus choose the GPUs"
        return node, include, note
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if not all(v.isascii() and v.isdigit() for v in ids):
        raise HostfileError(
            f"CUDA_VISIBLE_DEVICES={visible}: only GPU numbers are understood here; "
            "unset it and choose GPUs with --include 'localhost:0,1'"
        )
    for v in ids:
        if int(v) >= gpus:
            raise HostfileError(f"CUDA_VISIBLE_DEVICES={visible}: there is no GPU {v} here (0..{gpus - 1})")
    return node, "localhost:" + ",".join(ids), None
