"""How many processes on which machines: the launcher settings resolved for this machine and job."""

from __future__ import annotations
import os
import re
import socket
from dataclasses import dataclass, replace
from alignment.errors import ConfigError
from alignment.config.schema import RunConfig, freeze
from alignment.runtime.ranks import launched_run_dir


MULTI_PROCESS_BACKENDS = ("ddp", "fsdp", "zero3")


DEFAULT_MULTI_NODE_PORT = 29500


@dataclass(frozen=True)
class Machine:
    """Where this launching process sits among the job's machines."""

    num_machines: int
    machine_rank: int
    main_process_ip: str
    main_process_port: int
    slurm_job_id: str | None = None


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_num_processes(cfg: RunConfig, gpus: int) -> int:
    """Every visible GPU on every machine; on CPU one process, or two for the multi-process backends."""
    if cfg.backend.name == "single":
        return 1
    if gpus and cfg.backend.device != "cpu":
        return gpus * cfg.launcher.num_machines
    return 2


def resolve_launcher(cfg: RunConfig) -> RunConfig:
    """Fill launcher.num_processes from the visible devices when it is null, so every rank sees one number."""
    if cfg.launcher.num_processes is not None:
        return cfg
    launcher = replace(cfg.launcher, num_processes=default_num_processes(cfg, visible_gpus()))
    return freeze(replace(cfg, launcher=launcher))


def needs_launch(cfg: RunConfig) -> bool:
    """A multi-process backend started from a plain command (not already a launched rank)."""
    return cfg.backend.name in MULTI_PROCESS_BACKENDS and launched_run_dir() is None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-005,9],cpu1' → 'gpu003' (what `scontrol show hostnames` gives)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ConfigError(f"cannot read the SLURM node list {nodelist!r}; set launcher.main_process_ip.")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine(cfg: RunConfig, env: dict[str, str] | None = None) -> Machine:
    """This machine's place in the job: from the launcher settings, else from SLURM's environment."""
    env = os.environ if env is None else env
    launcher = cfg.launcher
    if launcher.num_machines == 1:
        return Machine(1, 0, launcher.main_process_ip or "127.0.0.1", launcher.main_process_port or free_port())
    job = env.get("SLURM_JOB_ID")
    rank = launcher.machine_rank if launcher.machine_rank is not None else env.get("SLURM_NODEID")
    ip = launcher.main_process_ip or env.get("MASTER_ADDR") or (
        first_slurm_host(env["SLURM_JOB_NODELIST"]) if env.get("SLURM_JOB_NODELIST") else None)
    if rank is None or ip is None:
        raise ConfigError(
            f"launcher.num_machines={launcher.num_machines} needs each machine's rank and the main machine's address: "
            f"run under SLURM (launchers/slurm.sbatch sets them), or pass launcher.machine_rank and "
            f"launcher.main_process_ip on every machine.")
    nodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if job and nodes and int(nodes) != launcher.num_machines:
        raise ConfigError(f"launcher.num_machines={launcher.num_machines} but SLURM gave this job {nodes} nodes. "
                          f"Pass launcher.num_machines={nodes} (launchers/slurm.sbatch does).")
    return Machine(launcher.num_machines, int(rank), ip, launcher.main_process_port or DEFAULT_MULTI_NODE_PORT, job)


def is_secondary_machine(cfg: RunConfig, env: dict[str, str] | None = None) -> bool:
    """Machines other than the first of a multi-node job: they join a run dir that machine 0 checks and owns."""
    env = os.environ if env is None else env
    if cfg.launcher.num_machines <= 1:
        return False
    rank = cfg.launcher.machine_rank if cfg.launcher.machine_rank is not None else env.get("SLURM_NODEID", "0")
    return int(rank) > 0
