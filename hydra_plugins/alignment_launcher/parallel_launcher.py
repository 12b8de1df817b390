"""`hydra/launcher=parallel`: a --multirun's members side by side on this machine, each its own process.

Hydra glue only: the member dirs and configs come from Hydra exactly as the basic launcher makes them (the sweep
dir named by the command, `<sweep dir>/<job num>`); where members run is alignment.sweep.slots, how a member
process runs and reports is alignment.sweep.member_process (alignment.runner.run_member inside it), and the
scheduling is alignment.sweep.schedule. The sweep summary and the exit code come from the SweepSummary callback,
as for every sweep.
"""

# No `from __future__ import annotations`: Hydra executes plugin modules without registering them in sys.modules,
# and dataclasses then cannot resolve string annotations.
import copy
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobRuntime, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger("alignment")

EXIT_BAD_INPUT = 2      # alignment.__main__'s: refused settings
EXIT_INTERRUPTED = 75   # alignment.runtime.preemption's: stopped by a signal, resumable


@dataclass
class ParallelLauncherConf:
    """Typed settings (alignment/conf/hydra/launcher/parallel.yaml picks them up): a wrong type fails composition."""

    _target_: str = "hydra_plugins.alignment_launcher.parallel_launcher.ParallelLauncher"
    members_in_parallel: Optional[int] = None
    devices_per_member: Optional[int] = None
    threads_per_member: Optional[int] = None


ConfigStore.instance().store(group="hydra/launcher", name="alignment_parallel", node=ParallelLauncherConf,
                             provider="alignment")


def _refuse(err: Exception) -> None:
    print(f"alignment: error: {err}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


class ParallelLauncher(Launcher):
    def __init__(self, members_in_parallel: Optional[int] = None, devices_per_member: Optional[int] = None,
                 threads_per_member: Optional[int] = None) -> None:
        super().__init__()
        self.given = {"members_in_parallel": members_in_parallel, "devices_per_member": devices_per_member,
                      "threads_per_member": threads_per_member}
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.slots: list = []

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Checked before the sweeper makes the sweep dir: settings this machine cannot honour start nothing."""
        from alignment.errors import ConfigError
        from alignment.sweep.slots import ParallelSettings, check_member, plan_slots, visible_devices

        self.config, self.hydra_context = config, hydra_context
        try:
            self.slots = plan_slots(ParallelSettings(**self.given), visible_devices(), os.cpu_count() or 1)
            check_member(_needs(config, "the sweep"), self.slots)
        except ConfigError as err:
            _refuse(err)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from alignment.errors import ConfigError
        from alignment.secrets import redact_text
        from alignment.sweep.member_process import Member, member_command, settle
        from alignment.sweep.schedule import Planned, run_in_slots
        from alignment.sweep.slots import check_member, member_port_override
        from alignment.sweep.sweeps import member_state, objective_value

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        swept_keys = _swept_keys(list(self.config.hydra.overrides.task))
        jobs, planned = [], []
        for offset, overrides in enumerate(job_overrides):
            number = initial_job_idx + offset
            sweep_config = self._member_config(list(overrides), number)
            member_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
            own = [o for o in filter_overrides(overrides) if not o.startswith("hydra/")]
            swept = redact_text(" ".join(o for o in own if o.split("=", 1)[0].lstrip("+~") in swept_keys))
            label = f"sweep member {number}" + (f" ({swept})" if swept else "")
            needs = _needs(sweep_config, label)
            try:
                check_member(needs, self.slots)
            except ConfigError as err:
                _refuse(err)
            jobs.append((number, list(overrides), sweep_config, member_dir))
            if member_state(member_dir) == "finished":  # as run_member: a rerun skips what is done
                log.info("sweep member %d (%s) already finished in %s: skipped", number, redact_text(" ".join(own)),
                         member_dir)
                continue
            member = Member(member_dir.resolve(), number, own)
            cwd = None
            if sweep_config.hydra.job.chdir:  # as run_job would: the member runs inside its own dir
                member.dir.mkdir(parents=True, exist_ok=True)
                cwd = member.dir
            planned.append(Planned(member, member_command([*overrides, *member_port_override(needs, number,
                                                                                               self.slots)]),
                                   f"[member {number}{' ' + swept if swept else ''}]", cwd))
        at_once = min(len(self.slots), len(planned))
        log.info("Launching %d jobs locally, %d at a time (%s each)", len(job_overrides), at_once,
                 self.slots[0].size())
        for item in planned:
            log.info("\t#%d : %s", item.member.number, redact_text(" ".join(item.member.overrides)))
        outcome = run_in_slots(planned, self.slots, float(self.config.preemption.grace_s), settle)
        if outcome.interrupted:  # as the basic launcher: a signal stops the sweep; the same command resumes it
            print(f"alignment: interrupted: {outcome.interrupted}; the running members stopped with a checkpoint. "
                  f"Run the same command again to resume the sweep.", file=sys.stderr, flush=True)
            sys.exit(EXIT_INTERRUPTED)
        return [self._job_return(overrides, sweep_config, objective_value(member_dir, str(sweep_config.objective)))
                for number, overrides, sweep_config, member_dir in jobs]

    def _member_config(self, overrides: list[str], number: int) -> DictConfig:
        """The member's config and dirs exactly as the basic launcher composes them (Hydra's sweep config)."""
        assert self.config is not None and self.hydra_context is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = number
            sweep_config.hydra.job.num = number
        HydraConfig.instance().set_config(sweep_config)  # ${hydra:...} in the sweep dir resolves for this member
        return sweep_config

    @staticmethod
    def _job_return(overrides: list[str], sweep_config: DictConfig, value: float) -> JobReturn:
        """What run_job returns for an in-process member: its configs, and its objective (NaN when it failed)."""
        task_config = copy.deepcopy(sweep_config)
        with read_write(task_config), open_dict(task_config):
            del task_config["hydra"]
        ret = JobReturn(overrides=overrides, cfg=task_config, hydra_cfg=OmegaConf.masked_copy(sweep_config, "hydra"),
                        working_dir=os.getcwd(), task_name=JobRuntime.instance().get("name"),
                        status=JobStatus.COMPLETED)
        ret.return_value = value
        return ret


def _swept_keys(command: list[str]) -> set:
    """The keys the command sweeps (`beta=0.05,0.1`, `beta=interval(...)`): what tells a member apart in its name.
    Read from the parsed command, since the sweeper writes a member's values its own way (1e-3 becomes 0.001)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.key_or_group for o in OverridesParser.create().parse_overrides(command) if o.is_sweep_override()}


def _needs(config: DictConfig, label: str):
    from alignment.sweep.slots import MemberNeeds

    launcher, backend = config.launcher, config.backend
    return MemberNeeds(label=label, backend=str(backend.name), device=str(backend.device),
                       num_processes=launcher.num_processes, num_machines=int(launcher.num_machines),
                       main_process_port=launcher.main_process_port)


__all__ = ["ParallelLauncher", "ParallelLauncherConf"]
