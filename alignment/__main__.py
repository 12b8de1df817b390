"""`python -m alignment`: compose → RunConfig → validate → dispatch. No training logic lives here."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from .compose import CONF_DIR, CONFIG_NAME, preflight
from .config import ConfigError, to_run_config
from .ranks import LAUNCH_STARTED

EXIT_BAD_INPUT = 2


def _fail(err: ConfigError) -> None:
    print(f"alignment: error: {err}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


@hydra.main(config_path=str(CONF_DIR), config_name=CONFIG_NAME, version_base="1.3")
def _hydra_entry(composed) -> None:
    hydra_config = HydraConfig.get()
    member_dir = Path(hydra_config.runtime.output_dir) if hydra_config.mode == RunMode.MULTIRUN else None
    from .launch import LaunchFailed
    from .runner import run  # imported here so that bad input is refused before torch/transformers load

    try:
        run(to_run_config(composed), list(hydra_config.overrides.task), member_dir)
    except ConfigError as err:
        _fail(err)
    except LaunchFailed as err:
        print(f"alignment: error: {err}", file=sys.stderr)
        sys.exit(err.returncode)


def main() -> None:
    # When the command started, kept across a re-launch, so rank 0 can report command → first step.
    os.environ.setdefault(LAUNCH_STARTED, str(time.time()))
    # Every member of the command is composed and validated before Hydra starts the first one.
    try:
        preflight(sys.argv[1:])
    except ConfigError as err:
        _fail(err)
    _hydra_entry()


if __name__ == "__main__":
    main()
