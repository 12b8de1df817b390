"""`python -m alignment rerun=<run dir> [overrides]`: the same run again, into a new run dir.

A run dir's config.yaml records the overrides that composed it (`overrides`) and its summary.json the user's
config dirs; the rerun composes from exactly those, so it trains the same thing with the same seed (a CPU tiny
run reproduces its per-step losses bit for bit). A chain's dir reruns the chain; a chain link's dir reruns that
link alone, from the same parent; a sweep member's dir reruns that member. Overrides given beside `rerun=` win
over the recorded ones (`rerun=<dir> stage.max_steps=100`).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from alignment.errors import ConfigError
from alignment.config.schema import override_key
from alignment.secrets import MASK
from alignment.preflight.compose import search_path_override

RERUN_KEY = "rerun"
# Recorded settings that name the old run's place or mode: a rerun gets a fresh run dir and really trains.
NOT_CARRIED = ("run_dir", "resume", "dry_run", "data_report")


def recorded_command(run_dir: Path) -> tuple[list[str], list[str]]:
    """The overrides and config dirs a run dir recorded; ConfigError when it cannot be rerun as it was."""
    config = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise ConfigError(f"rerun={run_dir}: no such run dir.")
    if not config.exists():
        raise ConfigError(f"rerun={run_dir}: no config.yaml there; point rerun at a run dir (or a chain's dir).")
    saved = yaml.safe_load(config.read_text()) or {}
    if "overrides" not in saved:
        raise ConfigError(f"rerun={run_dir}: its config.yaml predates recorded overrides, so the command that made "
                          f"it is unknown. Compose it again by hand from the values in {config}.")
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    config_dirs = (summary.get("command") or {}).get("config_dirs") or []
    missing = [d for d in config_dirs if d.startswith("file://") and not Path(d[len("file://"):]).is_dir()]
    if missing:
        raise ConfigError(f"rerun={run_dir}: the run composed with config dir(s) {', '.join(missing)}, which no "
                          f"longer exist. Restore them, or rerun with --config-dir=<their new place>.")
    return [str(o) for o in saved["overrides"]], config_dirs


def expand_rerun(argv: list[str]) -> list[str]:
    """argv with `rerun=<dir>` replaced by that run's recorded overrides (the other arguments kept, and winning)."""
    reruns = [a for a in argv if a.startswith(f"{RERUN_KEY}=")]
    if not reruns:
        return argv
    if len(reruns) > 1:
        raise ConfigError("rerun= given more than once; rerun one run dir per command.")
    if "--multirun" in argv or "-m" in argv:
        raise ConfigError("rerun= reruns one run dir and cannot be combined with --multirun; rerun each member's "
                          "dir, or repeat the sweep's command line.")
    run_dir = Path(reruns[0].split("=", 1)[1].strip("'\"")).expanduser().resolve()
    overrides, config_dirs = recorded_command(run_dir)
    rest = [a for a in argv if a != reruns[0]]
    given = {override_key(a) for a in rest if not a.startswith("-")}
    carried = [o for o in overrides if override_key(o) not in NOT_CARRIED and override_key(o) not in given]
    masked = [override_key(o) for o in carried if MASK in o]
    if masked:
        raise ConfigError(f"rerun={run_dir}: the recorded value of {', '.join(masked)} is masked (a secret); give "
                          f"it again on the command line beside rerun=.")
    if config_dirs and not any(a.startswith(("-cd", "--config-dir", "hydra.searchpath=")) for a in rest):

        rest.append(search_path_override(config_dirs))
    return [*carried, *rest]
