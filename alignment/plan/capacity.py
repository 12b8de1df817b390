"""How much memory one process of a run may use: measured where its ranks will run, or configured for a plan made
elsewhere.

A real run measures the machine it runs on (each SLURM node's `python -m alignment` runs on that node, so it measures
its own GPUs): on CUDA the free memory of the devices its processes will use, the smallest counting; on CPU the host's
available RAM, shared by every process of the machine. A dry run plans for devices that need not be here (a laptop
planning a SLURM job), so it uses `launcher.gpu_memory_gb` as configured.

ALIGNMENT_MEMORY_CAPACITY_GB replaces the measurement (tests and what-ifs only: "would this run be admitted with
24 GB free?"): the free memory of each GPU, or on CPU the host RAM shared by the machine's processes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass

from alignment.config.schema import RunConfig
from alignment.errors import ConfigError
from alignment.models.modeling import uses_cuda
from alignment.plan.memory import GB
from alignment.plan.processes import resolve_launcher
from alignment.runtime.ranks import launched_run_dir

log = logging.getLogger(__name__)

CAPACITY_ENV = "ALIGNMENT_MEMORY_CAPACITY_GB"


@dataclass(frozen=True)
class Capacity:
    """Memory one process may use, and where that number comes from."""

    bytes_per_device: float
    source: str      # for messages and the record, e.g. "free on the smallest of 2 CUDA devices (measured)"
    measured: bool   # false: launcher.gpu_memory_gb, as configured
    cuda: bool       # the run computes on CUDA devices (else on the CPU, in float32: memory.run_dtype)


def capacity_for(cfg: RunConfig) -> Capacity:
    """A dry run's or data report's: configured; a run's: measured here (with launcher.memory_gate=warn, a
    measurement that fails falls back to the configured one).

    A launched rank never measures: its devices are shared with the other ranks by then, and its launching process
    measured them before starting it (the rank reads that plan, alignment/plan/resolved.py); a rank without it (a
    chain link composed before its run dir is known) plans against launcher.gpu_memory_gb."""
    if cfg.dry_run or cfg.data_report or launched_run_dir() is not None:
        return configured_capacity(cfg)
    cfg = resolve_launcher(cfg)
    cuda = uses_cuda(cfg)
    try:
        return measured_capacity(cfg, cuda)
    except ConfigError as err:
        if cfg.launcher.memory_gate != "warn":
            raise
        log.warning("%s Using launcher.gpu_memory_gb instead (launcher.memory_gate=warn).", err)
        return configured_capacity(cfg, cuda)


def processes_here(cfg: RunConfig) -> int:
    """The run's processes on this machine (launcher.num_processes is over all machines)."""
    return max(1, (cfg.launcher.num_processes or 1) // max(1, cfg.launcher.num_machines))


def configured_capacity(cfg: RunConfig, cuda: bool = True) -> Capacity:
    return Capacity(cfg.launcher.gpu_memory_gb * GB, f"launcher.gpu_memory_gb={cfg.launcher.gpu_memory_gb:g}",
                    measured=False, cuda=cuda)


def measured_capacity(cfg: RunConfig, cuda: bool) -> Capacity:
    """What one process may use here, now: per GPU on CUDA, the host RAM divided among the processes on CPU."""
    processes = processes_here(cfg)
    override = os.environ.get(CAPACITY_ENV)
    if override:
        try:
            free = float(override) * GB
        except ValueError:
            raise ConfigError(f"{CAPACITY_ENV}={override} is not a number of GB. Unset it (the run then measures the "
                              f"free memory) or give e.g. {CAPACITY_ENV}=24.") from None
        where = f"{CAPACITY_ENV}={override}"
    elif cuda:
        free = min(_cuda_free_bytes(processes))
        where = ("free on cuda:0" if processes == 1 else f"the least free of cuda:0..{processes - 1}") + ", measured"
    else:
        free, where = float(_host_available_bytes()), "host RAM available, measured"
    if cuda:
        return Capacity(free, where, measured=True, cuda=True)
    # Every process of a CPU run lives in the same RAM.
    return Capacity(free / processes, where + (f", shared by {processes} processes" if processes > 1 else ""),
                    measured=True, cuda=False)


def _host_available_bytes() -> int:
    """MemAvailable: free RAM plus what the kernel can reclaim (page cache) without swapping."""
    try:
        import psutil  # a dependency of accelerate

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise ConfigError("cannot read the available host memory (no psutil, no /proc/meminfo MemAvailable). Set "
                      f"launcher.memory_gate=warn to run without the memory check.")


# CUDA devices measured by this process, by how many: preflight and the launch ask seconds apart.
_CUDA_FREE: dict[tuple[str, int], list[int]] = {}

_MEASURE = ("import json, torch; print(json.dumps([torch.cuda.mem_get_info(i)[0] for i in "
            "range(min({n}, torch.cuda.device_count()))]))")


def _cuda_free_bytes(devices: int) -> list[int]:
    """Free bytes of the first `devices` visible GPUs (local rank i trains on cuda:i).

    Measured in a child process: torch.cuda.mem_get_info creates a CUDA context (hundreds of MB) on every device it
    asks about, which the launching process, which never trains, would otherwise hold while its ranks run.
    """
    key = (os.environ.get("CUDA_VISIBLE_DEVICES", ""), devices)
    if key not in _CUDA_FREE:
        result = subprocess.run([sys.executable, "-c", _MEASURE.format(n=devices)], capture_output=True, text=True,
                                timeout=300)
        free = json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else []
        if not free:
            raise ConfigError(f"could not measure the free GPU memory ({' '.join(result.stderr.split())[-300:]}). "
                              f"Set launcher.memory_gate=warn to run without the memory check.")
        _CUDA_FREE[key] = free
    return _CUDA_FREE[key]
