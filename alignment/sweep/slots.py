"""Where the members of a parallel sweep run (`hydra/launcher=parallel`): how many at once, on which GPUs, with how
many CPU threads, and the refusals when the settings ask for more than this machine has.

A slot is one place a member can run: a disjoint group of GPUs (`CUDA_VISIBLE_DEVICES`), or on a machine without
GPUs a share of the CPU cores. Members wait for a free slot; each member runs in one slot from start to end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from alignment.errors import ConfigError

MULTI_PROCESS_BACKENDS = ("ddp", "fsdp", "zero3")
# A multi-process member of a parallel sweep gets launcher.main_process_port = PORT_BASE + its member number: two
# members starting their ranks at the same time never race for one port, and a rerun of the sweep gives a member the
# same port again (the port is part of the config a resumed run must match).
PORT_BASE = 29510
SETTINGS = "hydra.launcher"


@dataclass(frozen=True)
class ParallelSettings:
    """`hydra.launcher.*` of hydra/launcher=parallel (alignment/conf/hydra/launcher/parallel.yaml)."""

    members_in_parallel: Optional[int] = None  # null: as many as there are GPU groups (on CPU: cores // threads)
    devices_per_member: Optional[int] = None   # GPUs each member sees; null: 1 on a GPU machine, none on CPU
    threads_per_member: Optional[int] = None   # OMP/torch threads of each member process; null: cores // members

    def __post_init__(self) -> None:
        for name in ("members_in_parallel", "devices_per_member", "threads_per_member"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{SETTINGS}.{name}={value} must be a whole number of at least 1 (or null).")


@dataclass(frozen=True)
class Slot:
    index: int
    devices: Optional[tuple[str, ...]]  # CUDA_VISIBLE_DEVICES entries of this slot; None on a machine without GPUs
    threads: Optional[int]              # OMP_NUM_THREADS of the member; None: the library's own default

    def environment(self) -> dict[str, str]:
        env = {}
        if self.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices)
        if self.threads is not None:
            # torch sizes its intra-op pool from OMP_NUM_THREADS at import; MKL and OpenBLAS read their own.
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                       OPENBLAS_NUM_THREADS=str(self.threads))
        return env

    def describe(self) -> str:
        """This slot's own resources: `GPUs 2,3`, `GPU 0, 4 threads`, `1 thread`."""
        parts = []
        if self.devices is not None:
            parts.append(f"GPU{'s' if len(self.devices) > 1 else ''} {','.join(self.devices)}")
        if self.threads is not None:
            parts.append(_count(self.threads, "thread"))
        return ", ".join(parts) or "default devices"

    def size(self) -> str:
        """What every slot has, for the sweep's first line: `2 GPUs`, `1 thread`."""
        parts = ([_count(len(self.devices), "GPU")] if self.devices is not None else []) + (
            [_count(self.threads, "thread")] if self.threads is not None else [])
        return ", ".join(parts) or "default devices"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' if number != 1 else ''}"


def visible_devices() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (indices or UUIDs), in order."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    from alignment.plan.processes import visible_gpus

    count = visible_gpus()
    if given is not None and given.strip():
        return [d.strip() for d in given.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def _shown_devices() -> str:
    return f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}"


def plan_slots(settings: ParallelSettings, devices: list[str], cpus: int) -> list[Slot]:
    """The slots members run in; ConfigError (exit 2) when the settings ask for GPUs this machine does not show."""
    if not devices:
        if settings.devices_per_member is not None:
            raise ConfigError(f"{SETTINGS}.devices_per_member={settings.devices_per_member} but no GPU is visible on "
                              f"this machine ({_shown_devices()}). Leave it null to run the members on CPU.")
        threads = settings.threads_per_member
        count = settings.members_in_parallel or max(1, cpus // (threads or 1))
        threads = threads or max(1, cpus // count)
        return [Slot(i, None, threads) for i in range(count)]
    per_member = settings.devices_per_member or 1
    groups = len(devices) // per_member
    if groups == 0:
        raise ConfigError(f"{SETTINGS}.devices_per_member={per_member} but this machine shows {len(devices)} "
                          f"GPU(s) ({_shown_devices()}). Use devices_per_member<={len(devices)}.")
    count = settings.members_in_parallel or groups
    if count * per_member > len(devices):
        raise ConfigError(f"{SETTINGS}.members_in_parallel={count} x devices_per_member={per_member} needs "
                          f"{count * per_member} GPUs, but this machine shows {len(devices)} ({_shown_devices()}). "
                          f"Lower one of them, or leave members_in_parallel null ({groups} at a time).")
    return [Slot(i, tuple(devices[i * per_member:(i + 1) * per_member]), settings.threads_per_member)
            for i in range(count)]


@dataclass(frozen=True)
class MemberNeeds:
    """What a member's own config asks of its slot (read from its composed config before anything starts)."""

    label: str                     # how messages name it: "sweep member 1 (beta=0.1)", "the sweep"
    backend: str
    device: str                    # backend.device: auto | cuda | cpu
    num_processes: Optional[int]   # launcher.num_processes; null: every GPU the member sees
    num_machines: int
    main_process_port: Optional[int]


def check_member(needs: MemberNeeds, slots: list[Slot]) -> None:
    """Refuse (ConfigError, exit 2) a member that would not get what it asks for in its slot."""
    if needs.num_machines > 1:
        raise ConfigError(f"{needs.label}: launcher.num_machines={needs.num_machines}, but "
                          f"hydra/launcher=parallel runs members on this one machine. Use hydra/launcher=slurm.")
    per_member = len(slots[0].devices) if slots[0].devices is not None else None
    on_gpus = per_member is not None and needs.device != "cpu"
    if on_gpus and needs.num_processes is not None and needs.num_processes > per_member:
        raise ConfigError(f"{needs.label}: launcher.num_processes={needs.num_processes} but each member "
                          f"sees {per_member} GPU(s) ({SETTINGS}.devices_per_member={per_member}). Set "
                          f"{SETTINGS}.devices_per_member={needs.num_processes}, or launcher.num_processes<="
                          f"{per_member} (null uses all of the member's GPUs).")
    if needs.backend in MULTI_PROCESS_BACKENDS and needs.main_process_port is not None and len(slots) > 1:
        raise ConfigError(f"{needs.label}: launcher.main_process_port={needs.main_process_port} is one "
                          f"port for members that start their ranks at the same time. Leave it null (each member "
                          f"gets its own port), or set {SETTINGS}.members_in_parallel=1.")


def member_port_override(needs: MemberNeeds, number: int, slots: list[Slot]) -> list[str]:
    """A multi-process member's own rendezvous port, when several members may launch ranks at once."""
    if needs.backend not in MULTI_PROCESS_BACKENDS or needs.main_process_port is not None or len(slots) == 1:
        return []
    return [f"launcher.main_process_port={PORT_BASE + number}"]
