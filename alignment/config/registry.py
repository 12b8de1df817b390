"""The stage registry: one typed `Stage` description per method, the single place stage facts live.

Every part of the project that needs to know something about a stage asks its `Stage` here: validation (the data
format, the reference), the planner (sequences per example, logits held), the dry run and the model card (the
trainer), the diagnostics (which alarms read its metrics), the runner (how to build the trainer, what to add to
summary.json). Nothing compares `stage.name` with a string.

A stage registers itself when its module is imported: `register(Stage(...))` at module level. Built-in stages
live in `alignment.stages.<name>`; any other module is named by the stage YAML's `stage.module`, so a new method
is one module and one YAML (tests/test_stages.py adds one from a temporary config dir).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import import_module
from typing import Any, Callable, Optional

from alignment.errors import ConfigError
from alignment.config.schema import StageConfig, TrainingStageConfig

# Formats of the rows a stage reads, as alignment.data produces them (alignment/data/schemas.py):
# chat = {messages}; preference = {prompt, chosen, rejected}. A stage that trains on other rows (KTO's unpaired
# completions with a label) reads preference rows and converts them in its `rows` hook.
DATA_FORMATS = ("chat", "preference")


@dataclass(frozen=True)
class Stage:
    """What the rest of the project needs to know about one training (or evaluation) method."""

    name: str
    config: type[StageConfig]   # the stage's typed settings (a StageConfig subclass)
    description: str            # one line, for --help, the dry run and the model card
    trainer: str                # the class that trains, as the dry run and the card name it (e.g. trl.DPOTrainer)
    data_format: str            # the rows it reads: chat | preference
    # build_trainer(cfg, run, start, callbacks) -> a transformers Trainer; None: the stage trains nothing (eval).
    build_trainer: Optional[Callable[..., Any]] = None
    reference: bool = False     # it has a reference model: the `ref` group applies (alignment/plan/reference.py)
    # The ref options its trainer supports (ref=auto picks among them).
    reference_options: tuple[str, ...] = ("auto", "adapter_copy", "base", "separate", "precomputed")
    # Planner (alignment/plan/memory.py): sequences forwarded per example (DPO-style pairs: 2; KTO: the completion and
    # the mismatched KL completion, 2) and bytes per token and vocabulary entry of the full logits it holds
    # (0: TRL's chunked log-prob head keeps none).
    sequences_per_example: int = 1
    logit_bytes_per_vocab_entry: int = 8
    # Its logs carry rewards/chosen, rewards/rejected, rewards/margins and rewards/accuracies: the diagnostics'
    # preference alarms apply, and the demo-style first/last table shows them.
    preference_metrics: bool = False
    # The loss at step 1 when policy = reference, where the loss has a closed form at that point (DPO's sigmoid: ln 2).
    # Used by the diagnostics (loss stuck at that value = nothing learned) and the tests.
    initial_loss: Optional[Callable[[Any], Optional[float]]] = None
    # (file under trl/, config class) whose loss_type field lists the loss types the trainer takes (its `choices`, or
    # the ones its help text names): stage.loss_type is checked against it before anything loads. None: no loss_type.
    loss_types_from: Optional[tuple[str, str]] = None
    # summarize(trainer) -> extra summary.json fields (e.g. DPO's reference option and precompute cache).
    summarize: Optional[Callable[[Any], dict]] = None
    # Where TRL keeps the trainer when it is not in TRL's stable API (e.g. "trl.experimental.orpo"): the dry run and
    # the model card say so, and tests/test_stages.py pins what the stage relies on.
    experimental: Optional[str] = None

    @property
    def trains(self) -> bool:
        return self.build_trainer is not None

    def own_settings(self, stage_config: StageConfig) -> dict[str, Any]:
        """The settings of this stage's own class (beyond the shared trainer settings): the card and dry run show them."""
        shared = {f.name for f in dataclasses.fields(TrainingStageConfig)}
        return {f.name: getattr(stage_config, f.name) for f in dataclasses.fields(stage_config)
                if f.name not in shared}


_STAGES: dict[str, Stage] = {}
# The built-in stages, each a module alignment.stages.<name>; listed so that --help and errors can name them all.
BUILT_IN = ("sft", "dpo", "orpo", "kto", "cpo", "eval")


def register(stage: Stage) -> Stage:
    """Add a stage (called at import by the module that defines it). Registering a name twice is a bug: refused."""
    if stage.data_format not in DATA_FORMATS:
        raise ValueError(f"stage {stage.name}: data_format={stage.data_format} is not one of {DATA_FORMATS}")
    if not (isinstance(stage.config, type) and issubclass(stage.config, StageConfig)):
        raise ValueError(f"stage {stage.name}: config must be a StageConfig subclass")
    existing = _STAGES.get(stage.name)
    if existing is not None and existing is not stage and existing.config.__module__ != stage.config.__module__:
        raise ValueError(f"stage {stage.name} is registered twice ({existing.config.__module__} and "
                         f"{stage.config.__module__})")
    _STAGES[stage.name] = stage
    return stage


def stage_named(name: str, module: Optional[str] = None) -> Stage:
    """The registered stage `name`, importing its module (stage.module, or alignment.stages.<name>) first."""
    if name not in _STAGES:
        target = module or (f"alignment.stages.{name}" if name in BUILT_IN else None)
        if target is None:
            raise ConfigError(f"stage={name} is not a known stage. Valid values: {', '.join(BUILT_IN)}; a stage of "
                              f"your own sets stage.module to the Python module that registers it.")
        try:
            import_module(target)
        except ModuleNotFoundError as err:
            raise ConfigError(f"stage.module={target} (stage {name}) cannot be imported: {err}. Put the module on "
                              f"PYTHONPATH, or fix stage.module in the stage's YAML.") from None
        if name not in _STAGES:
            raise ConfigError(f"stage.module={target} was imported but registers no stage named {name} (it must "
                              f"call alignment.config.registry.register(Stage(name='{name}', ...))).")
    return _STAGES[name]


def stage_of(cfg: Any) -> Stage:
    """The Stage of a composed or typed run config."""
    return stage_named(cfg.stage.name, getattr(cfg.stage, "module", None))


def all_stages() -> dict[str, Stage]:
    """Every built-in stage (imported) and any other already registered."""
    for name in BUILT_IN:
        stage_named(name)
    return dict(_STAGES)


# Short top-level keys that set a field of the stage's own config (`beta=0.05` is stage.beta); the one place they
# are mapped. A stage without that field refuses the key rather than ignoring it.
SHORT_KEYS = ("beta",)


def apply_short_keys(merged: Any, stage: Stage) -> None:
    """Copy the short keys onto the stage's fields in a composed config (an OmegaConf node typed by stage.config).
    A stage without the field keeps nothing of it (a key no stage of the command uses is refused by preflight)."""
    fields = {f.name for f in dataclasses.fields(stage.config)}
    for key in SHORT_KEYS:
        if merged.get(key) is not None and key in fields:
            merged.stage[key] = merged[key]
