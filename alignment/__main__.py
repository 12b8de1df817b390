"""`python -m alignment`: compose → RunConfig → validate → dispatch. No training logic lives here."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from alignment.preflight.compose import CONF_DIR, CONFIG_NAME, preflight, search_path_of, search_path_override, to_run_config
from alignment.config.argv import cli_overrides
from alignment.config.search_path import search_path, set_search_path
from alignment.preflight.command_line import job_config_text, normalise, wants_job_config
from alignment.errors import ConfigError
from alignment.config.schema import with_overrides
from alignment.records.console import bars_above_logs
from alignment.runtime.optional import hide_unused_stacks
from alignment.records.provenance import remember_command
from alignment.launch.launcher import adopt_external_launch
from alignment.runtime.ranks import LAUNCH_STARTED, launched_run_dir, started_by_external_launcher
from alignment.sweep.naming import current_sweep_name

EXIT_BAD_INPUT = 2


def _fail(err: ConfigError) -> None:
    print(f"alignment: error: {err}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


@hydra.main(config_path=str(CONF_DIR), config_name=CONFIG_NAME, version_base="1.3")
def _hydra_entry(composed) -> None:
    hydra_config = HydraConfig.get()
    from alignment.evaluation import JudgeError
    from alignment.launch.launcher import LaunchFailed
    from alignment.runner import run, run_member  # imported here so that bad input is refused before torch/transformers load
    from alignment.records.diagnostics import TrainingFailed
    from alignment.runtime.preemption import EXIT_INTERRUPTED, Interrupted

    # Unresolved: a `${secret:NAME}` override is recorded (config.yaml, the ranks' command lines) as the reference.
    overrides = list(OmegaConf.to_container(hydra_config.overrides.task, resolve=False))
    try:
        cfg = with_overrides(to_run_config(composed), overrides)
        with bars_above_logs():
            if hydra_config.mode == RunMode.MULTIRUN:  # a member never stops the sweep; its status is recorded
                return run_member(cfg, overrides, Path(hydra_config.runtime.output_dir), int(hydra_config.job.num))
            run(cfg, overrides)
    except ConfigError as err:
        _fail(err)
    except Interrupted as err:  # SIGTERM/SIGINT: a checkpoint is written, the run dir says `interrupted`
        print(f"alignment: interrupted: {err}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except LaunchFailed as err:
        print(f"alignment: error: {err}", file=sys.stderr)
        sys.exit(err.returncode)
    except TrainingFailed as err:  # NaN/inf or a collapse: the run dir says `failed`, with this diagnosis
        print(f"alignment: error: training failed: {err}", file=sys.stderr)
        sys.exit(1)
    except JudgeError as err:  # the model and generations are saved; only the verdicts are missing
        print(f"alignment: error: {err}\nThe generations are kept in the run dir's eval/generations.jsonl.",
              file=sys.stderr)
        sys.exit(1)


def main() -> None:
    # When the command started, kept across a re-launch, so rank 0 can report command → first step.
    os.environ.setdefault(LAUNCH_STARTED, str(time.time()))
    remember_command(sys.argv[1:])
    try:
        sys.argv[1:] = normalise(sys.argv[1:])
    except ConfigError as err:
        _fail(err)
    current_sweep_name()  # fixed now, from this command line, before Hydra resolves any sweep dir
    # The user's config dirs: from this command line, or inherited from the command that launched this rank.
    own = search_path_of(sys.argv[1:])
    set_search_path(own or search_path())
    if search_path() and not own:
        sys.argv.append(search_path_override(search_path()))  # Hydra's own composition sees them too
    if launched_run_dir() is not None or started_by_external_launcher():
        from alignment.runtime.preemption import die_with_parent

        die_with_parent()  # a rank never trains on after its launcher is gone (it gets SIGTERM: checkpoint, exit)
    if started_by_external_launcher():  # `accelerate launch --config_file <run>/launch/accelerate.yaml -m alignment`
        try:
            adopt_external_launch(cli_overrides(sys.argv[1:]) or [])
        except ConfigError as err:
            _fail(err)
    if wants_job_config(sys.argv[1:]):
        try:
            print(job_config_text(sys.argv[1:]), end="")
        except ConfigError as err:
            _fail(err)
        return
    # Every member of the command is composed and validated before Hydra starts the first one.
    try:
        configs = preflight(sys.argv[1:])
    except ConfigError as err:
        _fail(err)
    hide_unused_stacks(configs or [])
    _hydra_entry()
    from alignment.sweep.sweeps import LAST_SWEEP

    if LAST_SWEEP.get("failed"):
        sys.exit(1)  # a sweep succeeds only when every member finished


if __name__ == "__main__":
    main()
