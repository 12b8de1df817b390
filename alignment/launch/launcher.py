"""Start every rank of a multi-process run from one command.

`python -m alignment backend=fsdp launcher.num_processes=2` is the whole story: the parent picks the run dir
once, writes the generated engine configs into `<run_dir>/launch/`, saves the exact command, and re-executes
`python -m alignment` with the same overrides and that fixed run dir under `accelerate launch`. The ranks never
resolve a run dir of their own, so they cannot scatter over `${now:}`-named directories.

Why accelerate launch for every backend: one launcher reads one generated config for ddp, FSDP2 and ZeRO-3
alike (it runs torchrun underneath, and DeepSpeed's engine inside the ranks), so the three backends share one
code path and one command shape. The `deepspeed` launcher would add a hostfile and passwordless ssh between
nodes, which SLURM's srun already replaces; plain torchrun would need the FSDP/DeepSpeed plugin settings
passed some other way.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from alignment.launch.backends import accelerate_config, deepspeed_config
from alignment.errors import ConfigError
from alignment.config.schema import RunConfig, override_key
from alignment.runtime.ranks import LAUNCH_STARTED, LAUNCHED_RUN_DIR
from alignment.secrets import redact_text
from alignment.plan.processes import Machine, machine, needs_launch
from alignment.config.search_path import SEARCH_PATH_ENV
from alignment.models.modeling import uses_cuda
from alignment.records.rundir import check_run_dir
from alignment.runtime.ranks import world_rank, world_size


class LaunchFailed(Exception):
    """A launched job ended with a non-zero exit code; the entrypoint exits with the same code."""

    def __init__(self, returncode: int, run_dir: Path):
        super().__init__(f"the launched ranks exited with code {returncode}; see {run_dir / 'run.log'}")
        self.returncode = returncode


def adopt_external_launch(overrides: list[str]) -> None:
    """Ranks started by an external launcher become ranks of one run: all of them write the run_dir the command
    names (required: ranks cannot agree on a time-stamped default), which rank 0 checks as a fresh run's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser


    given = [o for o in overrides if o.split("=", 1)[0].lstrip("+") == "run_dir"]
    if not given:
        raise ConfigError(f"started by an external launcher ({world_size()} processes) without run_dir=: every rank "
                          f"must write the same run dir. Add run_dir=<dir> to the command after `-m alignment`.")
    path = Path(str(OverridesParser.create().parse_overrides([given[-1]])[0].value())).expanduser().resolve()
    resume = any(o.split("=", 1)[0] == "resume" and o.split("=", 1)[1].lower() == "true" for o in overrides)
    if world_rank() == 0:
        check_run_dir(path, resume)
    os.environ[LAUNCHED_RUN_DIR] = str(path)


RUN_DIR_PER_JOB = "ALIGNMENT_RUN_DIR_PER_JOB"


def slurm_run_path(cfg: RunConfig, name: str, env: dict[str, str] | None = None) -> Path | None:
    """Under a multi-node SLURM job every node's parent must agree on the run dir without talking: the job id. Under
    launchers/slurm.sbatch (which sets ALIGNMENT_RUN_DIR_PER_JOB) a one-node job too, so a requeued job finds it."""
    env = os.environ if env is None else env
    if (cfg.launcher.num_machines > 1 or env.get(RUN_DIR_PER_JOB) == "1") and env.get("SLURM_JOB_ID"):
        return Path("outputs") / "slurm" / f"{env['SLURM_JOB_ID']}_{name}"
    return None


@dataclass(frozen=True)
class LaunchFiles:
    folder: Path

    @property
    def accelerate(self) -> Path:
        return self.folder / "accelerate.yaml"

    @property
    def deepspeed(self) -> Path:
        return self.folder / "deepspeed.json"

    def command(self, machine_rank: int) -> Path:
        return self.folder / ("command.sh" if machine_rank == 0 else f"command.node{machine_rank}.sh")


def launch_files(run_dir: Path) -> LaunchFiles:
    return LaunchFiles(run_dir / "launch")


def rank_overrides(user_overrides: list[str], cfg: RunConfig) -> list[str]:
    """The user's overrides, with the run dir and the process count fixed for every rank."""
    fixed = ("run_dir", "launcher.num_processes", "dry_run")
    kept = [o for o in user_overrides if override_key(o) not in fixed]
    # Quoted: Hydra's override grammar would read '=' or ',' in a path as syntax.
    return [*kept, f"run_dir='{cfg.run_dir}'", f"launcher.num_processes={cfg.launcher.num_processes}"]


def launch_command(cfg: RunConfig, user_overrides: list[str], where: Machine) -> list[str]:
    files = launch_files(Path(cfg.run_dir))
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(files.accelerate),
        "--num_processes", str(cfg.launcher.num_processes),
        "--num_machines", str(where.num_machines),
        "--machine_rank", str(where.machine_rank),
        "--main_process_ip", where.main_process_ip,
        "--main_process_port", str(where.main_process_port),
        "-m", "alignment", *rank_overrides(user_overrides, cfg),
    ]


def rank_environment(cfg: RunConfig, uses_cuda: bool) -> dict[str, str]:
    """What every rank needs in its environment beyond the parent's own."""

    env = {LAUNCHED_RUN_DIR: str(cfg.run_dir), LAUNCH_STARTED: os.environ.get(LAUNCH_STARTED, str(time.time()))}
    if os.environ.get(SEARCH_PATH_ENV):  # the user's config dirs: the ranks compose with them too
        env[SEARCH_PATH_ENV] = os.environ[SEARCH_PATH_ENV]
    if cfg.backend.name == "zero3" and not uses_cuda:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator; without it DeepSpeed looks for CUDA
    return env


def shell_line(command: list[str], env: dict[str, str]) -> str:
    """The command as one copyable shell line, with secrets masked."""
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()) if k != LAUNCH_STARTED)
    return redact_text(f"{exports} {shlex.join(command)}".strip())


def launch_preview(cfg: RunConfig, user_overrides: list[str]) -> str | None:
    """What a dry run shows: the command this run would execute and where its generated configs would go."""
    if not needs_launch(cfg):
        return None

    try:
        where = machine(cfg)
    except ConfigError as err:
        return f"(cannot build the launch command here: {err})"
    command = launch_command(cfg, user_overrides, where)
    files = launch_files(Path(cfg.run_dir))
    written = [files.accelerate, files.command(where.machine_rank)] + ([files.deepspeed] if cfg.backend.name == "zero3" else [])
    return (f"{shell_line(command, rank_environment(cfg, uses_cuda(cfg)))}\n"
            f"generated at launch: {', '.join(str(p) for p in written)}")


def write_launch_files(cfg: RunConfig, command: list[str], env: dict[str, str], where: Machine) -> LaunchFiles:
    files = launch_files(Path(cfg.run_dir))
    files.folder.mkdir(parents=True, exist_ok=True)
    _write(files.accelerate, yaml.safe_dump(accelerate_config(cfg, files.deepspeed), sort_keys=False))
    if cfg.backend.name == "zero3":
        import json

        _write(files.deepspeed, json.dumps(deepspeed_config(cfg), indent=2) + "\n")
    # The accelerate config is found next to the script, so the launch/ folder works from wherever it is.
    line = shell_line(command, env).replace(shlex.quote(str(files.accelerate)), '"$HERE/accelerate.yaml"')
    _write(files.command(where.machine_rank),
           "#!/bin/sh\n# Generated by alignment: starts every rank of this run; runs as-is (sh command.sh), from any "
           "directory.\nHERE=\"$(cd \"$(dirname \"$0\")\" && pwd)\"\n"
           f"{line}\n")
    files.command(where.machine_rank).chmod(0o755)
    return files


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def launch(cfg: RunConfig, user_overrides: list[str], uses_cuda: bool) -> None:
    """Write the configs and the command into the run dir, print the command, and run it; wait for all ranks."""
    where = machine(cfg)
    command = launch_command(cfg, user_overrides, where)
    env = rank_environment(cfg, uses_cuda)
    write_launch_files(cfg, command, env, where)  # identical on every machine but the command's machine rank
    print(f"alignment: launching {cfg.launcher.num_processes} processes ({cfg.backend.name}) on "
          f"{where.num_machines} machine(s):\n  {shell_line(command, env)}", flush=True)
    from alignment.runtime.preemption import die_with_parent, forward_to  # here: importing it loads transformers

    # The launcher is its own process group, so SIGTERM/SIGINT reach the ranks once, through it (torchrun passes
    # them on and waits for the ranks' checkpoints), and it dies with this process however this process ends.
    child = subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True, preexec_fn=die_with_parent)
    stop_forwarding = forward_to(child.pid, cfg.preemption.grace_s)
    try:
        returncode = child.wait()
    finally:
        stop_forwarding()
    if returncode != 0:
        raise LaunchFailed(returncode, Path(cfg.run_dir))
