"""``[sandbox] memory_max`` through cgroup v2 (SPEC §17): a child cgroup per agent process.

opus can limit memory only inside a cgroup delegated to it (systemd's ``Delegate=yes``): it
moves itself into a leaf ``opus`` of that cgroup, enables the memory controller for its
children, and gives each sandboxed process a child cgroup with ``memory.max`` (and
``memory.swap.max = 0`` where swap is accounted, so the limit is not a swap file).
:func:`find_delegated` says where, or why not; nothing here raises on a host without one.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

__all__ = ("Delegated", "StageCgroup", "find_delegated", "parse_size")

log = logging.getLogger(__name__)

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """``"512M"`` → bytes (the config validated the shape)."""
    unit = text[-1] if text[-1].isalpha() else ""
    return int(text[: len(text) - len(unit)]) * _UNITS[unit]


@dataclass(frozen=True)
class Delegated:
    """A cgroup v2 folder opus may create children in, the memory controller enabled."""

    path: Path

    def child(self, name: str, memory_max: str) -> StageCgroup:
        """A new child cgroup limited to ``memory_max``; remove it with ``close()``."""
        path = self.path / f"opus-{name}-{secrets.token_hex(3)}"
        path.mkdir()
        try:
            (path / "memory.max").write_text(str(parse_size(memory_max)))
            swap = path / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
        except OSError:
            path.rmdir()
            raise
        return StageCgroup(path)


@dataclass(frozen=True)
class StageCgroup:
    """One agent process's cgroup: ``procs`` is where its pid is written before it execs."""

    path: Path

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError as e:  # a process still in it: the kernel frees it with the last one
            log.debug("cannot remove cgroup %s: %s", self.path, e)


def _own_cgroup(proc: Path, mountinfo: Path) -> Path | str:
    """The folder of this process's cgroup v2, or why there is none."""
    try:
        lines = proc.read_text().splitlines()
        mounts = mountinfo.read_text().splitlines()
    except OSError as e:
        return f"cannot read {e.filename}: {e.strerror}"
    rel = next((ln[3:] for ln in lines if ln.startswith("0::")), None)
    if rel is None:
        return "no cgroup v2 hierarchy (the host uses cgroup v1 only)"
    for line in mounts:
        head, _, tail = line.partition(" - ")
        fields = head.split()
        if tail.split()[:1] == ["cgroup2"] and len(fields) > 4:
            root, mount = fields[3], fields[4]
            inside = os.path.relpath(rel, root) if rel.startswith(root) else rel.lstrip("/")
            return Path(mount) / ("" if inside == "." else inside)
    return "cgroup v2 is not mounted"


def find_delegated(
    *,
    proc: Path = Path("/proc/self/cgroup"),
    mountinfo: Path = Path("/proc/self/mountinfo"),
    pid: int | None = None,
    prepare: bool = True,
) -> Delegated | str:
    """opus's delegated cgroup with memory enabled for children, or the reason it has none.

    ``prepare`` = False only looks (``opus validate``); True also moves this process into a
    leaf ``opus`` child and enables ``+memory`` for the children, as cgroup v2 requires.
    """
    found = _own_cgroup(proc, mountinfo)
    if isinstance(found, str):
        return found
    try:
        controllers = (found / "cgroup.controllers").read_text().split()
        enabled = (found / "cgroup.subtree_control").read_text().split()
    except OSError as e:
        return f"cannot read cgroup {found}: {e.strerror}"
    if "memory" not in controllers:
        return f"the memory controller is not available in cgroup {found}"
    if not os.access(found, os.W_OK) or not os.access(found / "cgroup.subtree_control", os.W_OK):
        return f"cgroup {found} is not delegated to opus (systemd: Delegate=yes)"
    if "memory" in enabled or not prepare:
        return Delegated(found)
    me = os.getpid() if pid is None else pid
    try:
        members = [int(p) for p in (found / "cgroup.procs").read_text().split()]
        if set(members) - {me}:
            return f"cgroup {found} holds other processes; opus cannot enable memory limits in it"
        leaf = found / "opus"
        leaf.mkdir(exist_ok=True)
        (leaf / "cgroup.procs").write_text(str(me))
        (found / "cgroup.subtree_control").write_text("+memory")
    except OSError as e:
        return f"cannot enable the memory controller in cgroup {found}: {e.strerror}"
    log.debug("memory limits through cgroup %s", found)
    return Delegated(found)
