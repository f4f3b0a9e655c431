"""Hostfiles (``hostname slots=N``) and DeepSpeed's ``--include``/``--exclude`` grammar.

The resource pool is an ordered mapping ``host -> list of slot ids``; its order is
the node order (node rank 0 is the first host, and it hosts the rendezvous).
Every error is a :class:`HostfileError` that names the file, the line and what is
accepted, because "Hostfile contains a bad entry" without a line number is the
most common launcher complaint.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

__all__ = [
    "HostfileError",
    "ResourcePool",
    "apply_filter",
    "parse_hostfile",
    "parse_node_specs",
    "read_hostfile",
    "select_resources",
]

ResourcePool = "OrderedDict[str, list[int]]"

# A host name: anything without whitespace, '#', '@', ':' or ','. The last three are
# the include/exclude grammar's separators, so a host using them could never be selected.
_HOST = r"[^\s#@:,]+"
_LINE = re.compile(rf"^(?P<host>{_HOST})(?:\s+(?P<rest>.*))?$")
_SLOTS = re.compile(r"^slots\s*=\s*(?P<n>\S+)$")


class HostfileError(ValueError):
    """A hostfile or an include/exclude filter is malformed or names unknown resources."""


def parse_hostfile(text: str, source: str = "<hostfile>") -> OrderedDict[str, int]:
    """Parse hostfile text into an ordered ``{host: slots}`` mapping.

    Accepted: one ``hostname slots=N`` per line (N a positive integer), ``#`` comments
    (whole-line or trailing), blank lines. A line with only a host name means one slot,
    as in MPI hostfiles. Duplicated hosts, bad slot counts and an empty file are errors.
    """
    pool: OrderedDict[str, int] = OrderedDict()
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        match = _LINE.match(line)
        if match is None:
            raise HostfileError(
                f"{where}: bad entry {raw.strip()!r}; expected 'hostname slots=N' "
                "(host names may not contain whitespace, '@', ':' or ',')"
            )
        host, rest = match["host"], (match["rest"] or "").strip()
        slots = 1
        if rest:
            slots_match = _SLOTS.match(rest)
            if slots_match is None:
                raise HostfileError(f"{where}: bad entry {raw.strip()!r}; expected 'hostname slots=N' after the host")
            value = slots_match["n"]
            if not value.isdigit() or int(value) < 1:
                raise HostfileError(f"{where}: host {host!r} has slots={value!r}; slots must be a positive integer")
            slots = int(value)
        if host in pool:
            raise HostfileError(
                f"{where}: host {host!r} is listed twice (first at line {first_line[host]}); list each host once"
            )
        pool[host] = slots
        first_line[host] = lineno
    if not pool:
        raise HostfileError(f"{source}: hostfile has no hosts; expected lines of 'hostname slots=N'")
    return pool


def read_hostfile(path: str | Path) -> OrderedDict[str, int] | None:
    """Read and parse a hostfile; ``None`` when the file does not exist (local run)."""
    path = Path(path)
    if not path.is_file():
        return None
    return parse_hostfile(path.read_text(), source=str(path))


def parse_node_specs(spec: str, what: str) -> OrderedDict[str, list[int] | None]:
    """Parse ``NODE_SPEC[@NODE_SPEC ...]`` with ``NODE_SPEC = NAME[:SLOT[,SLOT ...]]``.

    Returns ``{host: slots}`` where ``None`` means every slot of the host. ``what`` is the
    argument name used in error messages (``--include``/``--exclude``).
    """
    specs: OrderedDict[str, list[int] | None] = OrderedDict()
    for node in spec.split("@"):
        node = node.strip()
        if not node:
            raise HostfileError(f"{what} {spec!r}: empty node spec; expected NAME[:SLOT[,SLOT...]][@NAME...]")
        host, sep, slot_text = node.partition(":")
        if not host:
            raise HostfileError(f"{what} {spec!r}: node spec {node!r} has no host name")
        if not sep:
            specs[host] = None
            continue
        slots: list[int] = []
        for item in slot_text.split(","):
            item = item.strip()
            if not item.isdigit():
                raise HostfileError(
                    f"{what} {spec!r}: slot {item!r} of host {host!r} is not a non-negative integer; "
                    "expected NAME:SLOT[,SLOT...]"
                )
            slots.append(int(item))
        if host in specs and specs[host] is None:
            continue  # the whole host is already selected
        specs[host] = [*(specs.get(host) or []), *slots]
    return specs


def apply_filter(
    pool: OrderedDict[str, list[int]], include: str = "", exclude: str = ""
) -> OrderedDict[str, list[int]]:
    """Filter a ``{host: slot ids}`` pool by DeepSpeed's include/exclude strings.

    Include keeps only the named hosts (all their slots, or the listed ones); exclude
    removes hosts or single slots. Both at once, unknown hosts and slots a host does not
    have are errors. Hosts left with no slots are dropped; hostfile order is kept.
    """
    if include and exclude:
        raise HostfileError("--include and --exclude are mutually exclusive; use one of them")
    if not include and not exclude:
        return OrderedDict((h, list(s)) for h, s in pool.items())
    what = "--include" if include else "--exclude"
    specs = parse_node_specs(include or exclude, what)
    for host, slots in specs.items():
        if host not in pool:
            raise HostfileError(f"{what}: host {host!r} is not in the hostfile (hosts: {', '.join(pool)})")
        for slot in slots or []:
            if slot not in pool[host]:
                raise HostfileError(
                    f"{what}: host {host!r} has no slot {slot} (its slots: {', '.join(map(str, pool[host]))})"
                )
    result: OrderedDict[str, list[int]] = OrderedDict()
    for host, available in pool.items():
        if include:
            if host not in specs:
                continue
            wanted = specs[host]
            chosen = list(available) if wanted is None else [s for s in available if s in wanted]
        else:
            removed = specs.get(host, [])
            chosen = [] if removed is None else [s for s in available if s not in removed]
        if chosen:
            result[host] = chosen
    if not result:
        raise HostfileError(f"{what} {include or exclude!r} leaves no resources to run on")
    return result


def select_resources(
    pool: OrderedDict[str, int],
    include: str = "",
    exclude: str = "",
    num_nodes: int = -1,
    num_gpus: int = -1,
) -> OrderedDict[str, list[int]]:
    """The active resources: filter by include/exclude, then keep the first ``num_nodes``
    hosts and slots ``0..num_gpus-1`` on each (DeepSpeed's order of operations)."""
    if (num_nodes > 0 or num_gpus > 0) and (include or exclude):
        raise HostfileError("--num_nodes/--num_gpus cannot be combined with --include/--exclude")
    if num_nodes == 0 or num_nodes < -1:
        raise HostfileError(f"--num_nodes {num_nodes}: expected a positive number of nodes")
    if num_gpus == 0 or num_gpus < -1:
        raise HostfileError(f"--num_gpus {num_gpus}: expected a positive number of workers per node")
    active = apply_filter(OrderedDict((h, list(range(n))) for h, n in pool.items()), include, exclude)
    if num_nodes > 0:
        if num_nodes > len(active):
            raise HostfileError(
                f"--num_nodes {num_nodes} but only {len(active)} host(s) available: {', '.join(active)}"
            )
        active = OrderedDict(list(active.items())[:num_nodes])
    if num_gpus > 0:
        active = OrderedDict((h, list(range(num_gpus))) for h in active)
    return active
