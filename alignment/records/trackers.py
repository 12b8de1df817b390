"""External trackers (tracker=wandb | tensorboard) on top of what every run writes anyway.

W&B: the run is started here (rank 0), before the trainer, so its identity is ours: project, group = the
sweep (or the run itself), name from the overrides, tags from stage/model/backend, config = the resolved
RunConfig, all with secrets masked, reward metrics defined against the global step. transformers' W&B callback
then logs into this run. Without an API key the run is offline under <run_dir>/wandb/ (`wandb sync` later).
Command-line arguments and system metadata are not captured, so nothing from the command line reaches it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from alignment.config.schema import RunConfig
from alignment.records.rundir import RunDir, masked_config
from alignment.secrets import redact_text

log = logging.getLogger("alignment")
REWARD_METRICS = ("rewards/*", "logps/*", "logits/*", "loss", "grad_norm", "learning_rate")


def report_to(cfg: RunConfig) -> str:
    return {"none": "none", "wandb": "wandb", "tensorboard": "tensorboard"}[cfg.tracker.name]


def wandb_mode(cfg: RunConfig) -> str:
    if cfg.tracker.mode != "auto":
        return cfg.tracker.mode
    if os.environ.get("WANDB_MODE"):  # the user's (or CI's) own choice, e.g. disabled
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


# Set by a sweep member (alignment/runner.py run_member): the W&B group and the member's label.
SWEEP_GROUP_ENV, MEMBER_LABEL_ENV = "ALIGNMENT_SWEEP_GROUP", "ALIGNMENT_MEMBER_LABEL"


def member_label(overrides: list[str]) -> str:
    """A sweep member's run name at the tracker: its overrides, secrets masked (a URL's password, a key)."""
    label = " ".join(o for o in overrides if not o.startswith(("run_dir=", "parent_run=", "hydra")))
    return redact_text(label) or "defaults"


def tracker_environment(cfg: RunConfig, run: RunDir) -> None:
    """Environment the trainer's own tracker callbacks read (set before the trainer is built)."""
    if cfg.tracker.name == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.path / "tensorboard")


def start_tracker(cfg: RunConfig, run: RunDir) -> Any:
    """Start the W&B run (rank 0 only); returns it, or None for the other trackers."""
    if cfg.tracker.name != "wandb":
        return None
    # Masked again here: whatever set them, a secret never becomes a tracker's group or run name.
    group = redact_text(os.environ.get(SWEEP_GROUP_ENV) or run.path.name)
    name = redact_text(os.environ.get(MEMBER_LABEL_ENV) or run.path.name)
    import wandb

    mode = wandb_mode(cfg)
    os.environ.setdefault("WANDB_SILENT", "true")
    settings = wandb.Settings(x_disable_meta=True, x_disable_stats=True, disable_git=True, save_code=False,
                              console="off")
    tracker = wandb.init(project=cfg.tracker.project, entity=cfg.tracker.entity, group=group, name=name,
                         dir=str(run.path), mode=mode, reinit="finish_previous",
                         tags=[cfg.stage.name, cfg.model.name, cfg.backend.name], config=masked_config(cfg),
                         settings=settings)
    tracker.define_metric("train/global_step")
    for pattern in REWARD_METRICS:
        tracker.define_metric(f"train/{pattern}", step_metric="train/global_step")
        tracker.define_metric(f"eval/{pattern}", step_metric="train/global_step")
    if mode == "offline":
        log.info("W&B offline run in %s; upload later with `wandb sync %s`", tracker.dir, Path(tracker.dir).parent)
    return tracker


def finish_tracker(tracker: Any, failed: bool) -> None:
    if tracker is not None:
        tracker.finish(exit_code=1 if failed else 0)
