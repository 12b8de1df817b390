"""Checks a RunConfig before anything heavy runs; each failure names the key and what to do."""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import math
import os
import re
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .backends import check_engine_installed, check_wrap_class
from .batch import batch_plan
from .config import DATASET_FORMAT_FOR_STAGE, STAGES, ConfigError, RunConfig
from .data import SCHEMAS, check_sources, source_key
from .data.loading import settings_error
from .data.schemas import PROBLEM_KINDS
from .evaluation.harness import check_harness
from .evaluation.judges import check_judge
from .launch import is_secondary_machine, resolve_launcher, visible_gpus
from .modeling import check_model_source, check_target_modules, uses_cuda
from .optional import require_importable
from .ranks import launched_run_dir
from .reference import choose_reference
from .rundir import RunDir, check_run_dir, has_model
from .secrets import check_secret_settings, is_local_url, read_secret_env
from .rundir import OUTPUTS_ROOT
from .start import is_adapter_dir, keeps_parent_adapter, parent_is_adapter

_DTYPES = ("float32", "bfloat16", "float16", "auto")
_PRECISIONS = ("auto", "no", "bf16", "fp16")
_DEVICES = ("auto", "cpu", "cuda")
_BACKENDS = ("single", "ddp", "fsdp", "zero3")
_PEFT_METHODS = ("none", "lora", "qlora")
_QUANT_TYPES = ("nf4", "fp4")


def is_offline(cfg: RunConfig) -> bool:
    return cfg.offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(key: str, value: object, valid: tuple[str, ...]) -> None:
    _require(value in valid, f"{key}={value} is not supported. Valid values: {', '.join(valid)}.")


def validate(cfg: RunConfig, previous: RunConfig | None = None) -> None:
    """Raise ConfigError on the first problem. Filesystem checks are cheap; nothing is loaded.

    A dry run is checked exactly as the run it describes (tests/test_bad_input.py runs the whole table both ways):
    a plan that the run would then refuse is worth nothing. The one exception is the free space of the run dir's
    filesystem, a fact of the machine the run will use rather than of its configuration (check_run_location).

    previous: the chain link before this one, whose run dir (this link's parent) does not exist yet.
    """
    check_secret_settings(cfg)  # *_env settings name a variable, never hold a key; no secret in a run's name
    stage = cfg.stage
    _one_of("stage.name", stage.name, STAGES)
    check_numbers(cfg)  # every int and float setting: finite, and inside its range (NUMBER_RANGES)
    _require(stage.max_prompt_length is None or 1 <= stage.max_prompt_length < stage.max_length,
             f"stage.max_prompt_length must be null or in [1, stage.max_length) (got {stage.max_prompt_length} with "
             f"max_length {stage.max_length}): a prompt must leave room for the response.")
    _check_positions(cfg)
    _check_training_choices(cfg)
    _check_dataset(cfg)
    _check_eval(cfg)

    _check_model_type(cfg)
    _one_of("model.dtype", cfg.model.dtype, _DTYPES)
    _one_of("backend.name", cfg.backend.name, _BACKENDS)
    _one_of("backend.device", cfg.backend.device, _DEVICES)
    _one_of("backend.mixed_precision", cfg.backend.mixed_precision, _PRECISIONS)
    _one_of("peft.method", cfg.peft.method, _PEFT_METHODS)
    _one_of("tracker.name", cfg.tracker.name, ("none", "wandb", "tensorboard"))
    _one_of("tracker.mode", cfg.tracker.mode, ("auto", "offline", "online", "disabled"))
    _require(cfg.peft.method == "none" or cfg.peft.r >= 1, f"peft.r must be >= 1 (got {cfg.peft.r}).")
    if cfg.peft.method == "qlora":
        _check_qlora(cfg)
    check_target_modules(cfg)
    _check_launcher(cfg)
    _check_backend(cfg)
    _check_devices(cfg)

    if cfg.parent_run and previous is None:
        _check_parent(Path(cfg.parent_run))
    _check_start_and_reference(cfg, previous)
    if not cfg.parent_run:
        check_model_source(cfg.model, is_offline(cfg))
    if stage.name == "dpo" and cfg.ref.name == "separate":
        check_model_source(cfg.model, is_offline(cfg), path=cfg.ref.path, key="ref.path")
    check_sources(cfg.dataset, is_offline(cfg))
    # A launched rank's dir was checked by its parent, a secondary machine's by machine 0.
    if launched_run_dir() is None and not is_secondary_machine(cfg):
        check_run_location(cfg)  # a file, an unwritable or read-only place, too little space: refused unwritten
        if cfg.run_dir is not None:
            check_run_dir(Path(cfg.run_dir), cfg.resume)


def _check_dataset(cfg: RunConfig) -> None:
    """Schemas agree with the stage and policies are spelled right; paths are checked later by check_sources."""
    wanted = DATASET_FORMAT_FOR_STAGE[cfg.stage.name]
    dataset = cfg.dataset
    for index, source in enumerate(dataset.sources):
        key = source_key(index)
        error = settings_error(source, key)
        _require(error is None, error or "")
        fmt = SCHEMAS[source.schema].format
        # stage=eval without the preference accuracy only draws prompts: chat data serves as well.
        _require(fmt == wanted or (cfg.stage.name == "eval" and not cfg.eval.preference),
                 f"stage={cfg.stage.name} {'evaluates' if cfg.stage.name == 'eval' else 'trains'} on {wanted} data, "
                 f"but {key} ({source.name}) has schema "
                 f"{source.schema}, which holds {fmt} data. Pick a matching dataset, e.g. "
                 f"{'dataset=ultrachat_200k' if wanted == 'chat' else 'dataset=ultrafeedback_binarized'} "
                 f"(or dataset=tiny_{cfg.stage.name} offline).")
    for problem in PROBLEM_KINDS:
        _one_of(f"dataset.bad_rows.{problem}", getattr(dataset.bad_rows, problem), ("fail", "drop"))
    _one_of("dataset.lint", dataset.lint, ("fail", "warn", "off"))
    _require(dataset.lint_rows >= 0, f"dataset.lint_rows must be >= 0 (got {dataset.lint_rows}).")
    _require(dataset.num_proc is None or dataset.num_proc >= 1,
             f"dataset.num_proc must be null or >= 1 (got {dataset.num_proc}).")


def _check_eval(cfg: RunConfig) -> None:
    """Evaluation settings, the judge and the prompts file: refused before any training starts."""
    settings = cfg.eval
    if cfg.stage.name != "eval" and not settings.after_training:
        return
    generation = settings.generation
    _require(settings.batch_size >= 1, f"eval.batch_size must be >= 1 (got {settings.batch_size}).")
    _require(settings.max_pairs is None or settings.max_pairs >= 1,
             f"eval.max_pairs must be null or >= 1 (got {settings.max_pairs}).")
    _require(generation.num_prompts >= 0, f"eval.generation.num_prompts must be >= 0 (got {generation.num_prompts}).")
    _require(generation.samples_per_prompt >= 1,
             f"eval.generation.samples_per_prompt must be >= 1 (got {generation.samples_per_prompt}).")
    _require(generation.max_new_tokens >= 1,
             f"eval.generation.max_new_tokens must be >= 1 (got {generation.max_new_tokens}).")
    _require(generation.batch_size >= 1, f"eval.generation.batch_size must be >= 1 (got {generation.batch_size}).")
    _require(not generation.do_sample or generation.temperature > 0,
             f"eval.generation.temperature must be > 0 when sampling (got {generation.temperature}); use "
             f"eval.generation.do_sample=false for greedy answers.")
    _require(0 < generation.top_p <= 1, f"eval.generation.top_p must be in (0, 1] (got {generation.top_p}).")
    _require(generation.prompts is None or Path(generation.prompts).is_file(),
             f"eval.generation.prompts={generation.prompts} is not a file. Give a .jsonl or .txt file of prompts, "
             f"or null to use the eval split's prompts.")
    check_judge(settings.judge)
    if settings.judge.name == "http" and settings.judge.api_key_env and not is_local_url(settings.judge.url):
        read_secret_env("eval.judge.api_key_env", settings.judge.api_key_env,  # a remote API needs its key
                        "or eval.judge.api_key_env=null for a server that takes none")
    check_harness(settings)
    if settings.reference:
        reference = Path(settings.reference)
        _require(reference.exists() or not settings.reference.startswith(("/", ".", "~")),
                 f"eval.reference={settings.reference} does not exist. Give a run dir, a model or adapter dir, or a "
                 f"hub id, or null for the evaluated run's own reference.")
    if cfg.stage.name == "eval":
        _require(cfg.backend.name == "single",
                 f"stage=eval runs in one process, but backend={cfg.backend.name}. Use backend=single (the default).")
        _check_evaluated_model(cfg)


def _check_evaluated_model(cfg: RunConfig) -> None:
    """stage=eval loads the parent's model with this run's model settings (chat template, pad token, dtype)."""
    _require(bool(cfg.parent_run or cfg.model.name_or_path),
             f"stage=eval evaluates a trained model, but neither parent_run nor model.name_or_path is set: it would "
             f"evaluate an untrained {cfg.model.name} twin against itself. Add parent_run=<a finished run dir> (e.g. "
             f"outputs/<date>/<time>_demo-tiny_qwen2/2-dpo) or model.name_or_path=<a checkpoint>.")
    parent_config = Path(cfg.parent_run or "") / "config.yaml"
    if not cfg.parent_run or not parent_config.exists():
        return  # no parent, or a missing one (refused by _check_parent)
    import yaml

    trained = (yaml.safe_load(parent_config.read_text()) or {}).get("model", {}).get("name")
    _require(trained in (None, cfg.model.name),
             f"parent_run={cfg.parent_run} was trained with model={trained}, but this evaluation composes "
             f"model={cfg.model.name}, whose tokenizer settings (chat template, pad token) would be applied to it. "
             f"Add model={trained}.")


def _check_qlora(cfg: RunConfig) -> None:
    peft = cfg.peft
    _one_of("peft.quant_type", peft.quant_type, _QUANT_TYPES)
    _one_of("peft.compute_dtype", peft.compute_dtype, ("bfloat16", "float16", "float32"))
    _one_of("peft.quant_storage", peft.quant_storage, ("bfloat16", "float16", "float32", "uint8"))
    require_importable("bitsandbytes", "peft=qlora needs bitsandbytes with 4-bit support on this machine",
                       "Install it (`pip install bitsandbytes`; CUDA, or its CPU backend), or use peft=lora.")


def _check_devices(cfg: RunConfig) -> None:
    import torch

    cuda = uses_cuda(cfg)
    _require(cfg.backend.device != "cuda" or torch.cuda.is_available(),
             "backend.device=cuda but no CUDA device is visible. Use backend.device=auto or cpu.")
    _require(cuda or cfg.backend.mixed_precision in ("auto", "no"),
             f"backend.mixed_precision={cfg.backend.mixed_precision} needs a CUDA device; on CPU use "
             f"backend.mixed_precision=no (or auto).")
    launcher = resolve_launcher(cfg).launcher
    per_machine, gpus = launcher.num_processes // launcher.num_machines, visible_gpus()
    _require(not cuda or per_machine <= gpus,
             f"launcher.num_processes={launcher.num_processes} on {launcher.num_machines} machine(s) needs "
             f"{per_machine} GPUs per machine, but this machine shows {gpus} (CUDA_VISIBLE_DEVICES="
             f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Use launcher.num_processes={gpus * launcher.num_machines}, "
             f"or leave it null to use every visible GPU.")
    check_engine_installed(cfg)
    _check_tracker_installed(cfg)


def _check_tracker_installed(cfg: RunConfig) -> None:
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(cfg.tracker.name)
    if package is None:
        return
    require_importable(package, f"tracker={cfg.tracker.name} needs the {package} package",
                       f"Install it (`pip install {package}`) or use tracker=none (metrics.jsonl and plots/ are "
                       f"always written).")


def _check_backend(cfg: RunConfig) -> None:
    """Engine settings present for the chosen backend, FSDP's wrap class in the model, the batch splitting evenly."""
    backend = cfg.backend
    for name in ("fsdp", "zero3"):
        _require(backend.name != name or getattr(backend, name) is not None,
                 f"backend.name={name} has no backend.{name} settings: choose the config group instead, "
                 f"`backend={name}`, which brings them (alignment/conf/backend/{name}.yaml).")
    if backend.name == "fsdp":
        check_wrap_class(cfg)
    batch_plan(cfg, resolve_launcher(cfg).launcher.num_processes)


def _check_parent(parent: Path) -> None:
    _require(parent.is_dir(), f"parent_run={parent} does not exist. Point it at a finished SFT run dir.")
    _require(has_model(parent), f"parent_run={parent} is not a finished run (summary.json status is not "
                                  f"'finished'). Finish or resume it first.")
    model = RunDir(parent).model
    _require((model / "config.json").exists() or is_adapter_dir(model),
             f"parent_run={parent} has no saved model in {model} (neither config.json nor adapter_config.json). "
             f"Point parent_run at a run that finished training and saved its model.")


def _check_start_and_reference(cfg: RunConfig, previous: RunConfig | None) -> None:
    _one_of("parent_adapter", cfg.parent_adapter, ("auto", "keep", "merge"))
    from_adapter = parent_is_adapter(cfg, previous)
    _require(not (from_adapter and cfg.parent_adapter == "keep" and cfg.peft.method == "none"),
             "parent_adapter=keep trains the parent's LoRA adapter further, which needs peft=lora or peft=qlora. "
             "Use parent_adapter=merge (or auto) to fold it into its base and train every weight.")
    if cfg.stage.name == "dpo":
        choose_reference(cfg, adapter_kept=keeps_parent_adapter(cfg, from_adapter))


def _check_model_type(cfg: RunConfig) -> None:
    from transformers import CONFIG_MAPPING

    model_type = cfg.model.architecture.model_type
    _require(model_type in CONFIG_MAPPING,
             f"model.architecture.model_type={model_type} is not a model type transformers knows (e.g. qwen2, "
             f"mistral, llama). Copy model_type from the checkpoint's config.json.")
    template = cfg.model.tokenizer.chat_template
    _require(template in (None, "chatml", "zephyr"), f"model.tokenizer.chat_template={template} is not supported. "
             f"Valid values: chatml, zephyr, or null for the tokenizer's own template.")


def _check_launcher(cfg: RunConfig) -> None:
    launcher = cfg.launcher
    _require(launcher.num_machines >= 1, f"launcher.num_machines must be >= 1 (got {launcher.num_machines}).")
    _require(launcher.gpu_memory_gb > 0, f"launcher.gpu_memory_gb must be > 0 (got {launcher.gpu_memory_gb}).")
    _require(launcher.machine_rank is None or launcher.machine_rank < launcher.num_machines,
             f"launcher.machine_rank={launcher.machine_rank} must be below launcher.num_machines="
             f"{launcher.num_machines} (machines are numbered from 0).")
    processes = launcher.num_processes
    if processes is None:
        return  # filled from the visible devices (alignment/launch.py)
    _require(processes >= 1, f"launcher.num_processes must be >= 1 or null (got {processes}).")
    _require(processes % launcher.num_machines == 0,
             f"launcher.num_processes={processes} does not spread evenly over launcher.num_machines="
             f"{launcher.num_machines}: give the total over all machines, a multiple of the machine count.")
    _require(cfg.backend.name != "single" or (processes == 1 and launcher.num_machines == 1),
             f"backend=single runs one process, but launcher.num_processes={processes} and launcher.num_machines="
             f"{launcher.num_machines}. Choose backend=ddp (whole model per process), backend=fsdp or backend=zero3 "
             f"(sharded) for several processes.")


# ------------------------------------------------------------------------------------------------------------------
# Numbers. Every int and float setting of the RunConfig tree is found by walking the typed dataclasses, so a new
# field is checked for finiteness the day it is added; its range comes from NUMBER_RANGES (tests/test_bad_input.py
# fails for a numeric field that has none).
# ------------------------------------------------------------------------------------------------------------------


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


@dataclass(frozen=True)
class Range:
    """The values a numeric setting accepts: low..high (open ends where said), plus special values with a meaning."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    special: tuple[tuple[float, str], ...] = ()   # accepted values outside low..high, e.g. (-1, "train for epochs")
    note: str = ""                                 # what the setting does, or what to use

    def admits(self, value: float) -> bool:
        if any(value == special for special, _ in self.special):
            return True
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, nullable: bool) -> str:
        if self.low is not None and self.high is not None:
            bounds = (f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                      f"{')' if self.high_open else ']'}")
        elif self.low is not None:
            bounds = f"{'>' if self.low_open else '>='} {_number(self.low)}"
        elif self.high is not None:
            bounds = f"{'<' if self.high_open else '<='} {_number(self.high)}"
        else:
            bounds = "a finite number"
        specials = [f"{_number(value)} ({meaning})" for value, meaning in self.special]
        return " or ".join([*(["null"] if nullable else []), *specials, bounds])


_POSITIVE, _COUNT, _NON_NEGATIVE = Range(0, low_open=True), Range(1), Range(0)
_SHARE_OPEN_TOP = Range(0, 1, high_open=True)

# By dataclass name (a subclass inherits its base's ranges, e.g. DatasetConfig those of SourceConfig), then field.
NUMBER_RANGES: dict[str, dict[str, Range]] = {
    "ArchitectureConfig": {
        **dict.fromkeys(("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                         "intermediate_size", "vocab_size", "max_position_embeddings", "sliding_window", "head_dim"),
                        _COUNT),
        "rope_theta": _POSITIVE, "rms_norm_eps": _POSITIVE,
    },
    "StageConfig": {
        "max_steps": Range(0, low_open=True, special=((-1, "train for num_train_epochs"),)),
        "num_train_epochs": _POSITIVE,
        "per_device_train_batch_size": _COUNT, "per_device_eval_batch_size": _COUNT,
        "global_batch_size": Range(1, note=" null: one micro batch per process per step."),
        "max_length": Range(16, note=" It counts the tokens of prompt + response."),
        "max_prompt_length": _COUNT,
        "warmup_ratio": _SHARE_OPEN_TOP,
        "weight_decay": _NON_NEGATIVE,
        "max_grad_norm": Range(0, note=" Above 0 the gradient norm is clipped to it; 0 turns clipping off "
                                       "(transformers clips only when it is > 0). The recipes use 1.0."),
        "logging_steps": _COUNT, "eval_steps": _COUNT, "save_steps": _COUNT,
        "save_total_limit": Range(1, note=" null keeps every checkpoint."),
    },
    "SourceConfig": {"test_size": _SHARE_OPEN_TOP, "fraction": Range(0, 1, low_open=True), "rows": _COUNT,
                     "eval_rows": _COUNT},
    "DatasetConfig": {"lint_rows": _NON_NEGATIVE, "num_proc": _COUNT},
    "ZeroSettings": {"reduce_bucket_size": _COUNT, "prefetch_bucket_size": _NON_NEGATIVE,
                     "param_persistence_threshold": _NON_NEGATIVE, "steps_per_print": _COUNT},
    "PeftConfig": {"r": _COUNT,
                   "alpha": Range(0, low_open=True, note=" LoRA scales its update by alpha / r: at 0 the adapter "
                                                         "changes nothing. The presets use 2 × r."),
                   "dropout": _SHARE_OPEN_TOP},
    "LauncherConfig": {"num_processes": _COUNT, "num_machines": _COUNT, "machine_rank": _NON_NEGATIVE,
                       "main_process_port": Range(1, 65535), "gpu_memory_gb": _POSITIVE},
    "DiagnosticsConfig": {"after_steps": _NON_NEGATIVE, "window": _COUNT, "ln2_tolerance": _NON_NEGATIVE,
                          "grad_norm_low": _NON_NEGATIVE, "grad_norm_high": _POSITIVE, "accuracy_band": Range(0, 0.5),
                          "sinking_ratio": _POSITIVE, "collapse_grad_norm": _NON_NEGATIVE,
                          "collapse_loss_ratio": _POSITIVE},
    "GenerationConfig": {"num_prompts": _NON_NEGATIVE, "samples_per_prompt": _COUNT, "max_new_tokens": _COUNT,
                         "temperature": _NON_NEGATIVE, "top_p": Range(0, 1, low_open=True), "batch_size": _COUNT},
    "EvalConfig": {"max_pairs": _COUNT, "batch_size": _COUNT, "lm_eval_limit": _COUNT},
    "JudgeConfig": {"timeout_s": _POSITIVE, "max_tokens": _COUNT, "max_retries": _NON_NEGATIVE, "concurrency": _COUNT,
                    "backoff_s": _NON_NEGATIVE, "backoff_max_s": _NON_NEGATIVE},
    "PreemptionConfig": {"grace_s": _POSITIVE},
    "RunConfig": {
        "beta": Range(0, low_open=True, note=" It scales DPO's implicit reward; typical values are 0.01-0.5, e.g. "
                                             "beta=0.1."),
        "learning_rate": Range(0, low_open=True, note=" E.g. learning_rate=5e-7 for DPO or 2e-5 for SFT."),
        "seed": Range(0, 2**32 - 1, note=" numpy and torch take seeds in [0, 2^32)."),
    },
}


@dataclass(frozen=True)
class NumericSetting:
    key: str            # as written on the command line, e.g. dataset.mix[0].fraction
    owner: type         # the dataclass holding it
    name: str
    value: Any
    nullable: bool

    @property
    def range(self) -> Range | None:
        return range_of(self.owner, self.name)


def range_of(owner: type, name: str) -> Range | None:
    for cls in owner.__mro__:
        found = NUMBER_RANGES.get(cls.__name__, {}).get(name)
        if found is not None:
            return found
    return None


@functools.lru_cache(maxsize=None)
def _number_fields(cls: type) -> dict[str, bool]:
    """The int and float fields of a config dataclass → whether null is allowed (Optional[...])."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        args = typing.get_args(hint)
        nullable = type(None) in args
        base = next((a for a in args if a is not type(None)), None) if nullable else hint
        if base in (int, float):
            fields[f.name] = nullable
    return fields


def numeric_settings(obj: Any, prefix: str = "") -> Iterator[NumericSetting]:
    """Every int and float setting under a config dataclass, sources of a mix and engine settings included."""
    numbers = _number_fields(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from numeric_settings(value, f"{key}.")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from numeric_settings(item, f"{key}[{index}].")
        elif f.name in numbers:
            yield NumericSetting(key, type(obj), f.name, value, numbers[f.name])


def check_numbers(cfg: RunConfig) -> None:
    """Each int and float setting is finite and inside its range; the message names the key and the range."""
    for setting in numeric_settings(cfg):
        value, rule = setting.value, setting.range
        if value is None or isinstance(value, bool):
            continue  # null where allowed (the schema refuses it elsewhere)
        described = rule.describe(setting.nullable) if rule else "a finite number"
        note = rule.note if rule else ""
        if isinstance(value, float) and not math.isfinite(value) and not (rule and rule.admits(value)):
            raise ConfigError(f"{setting.key}={value} is not a finite number: it must be {described}.{note}")
        _require(rule is None or rule.admits(value), f"{setting.key} must be {described} (got {value}).{note}")


def _check_positions(cfg: RunConfig) -> None:
    """Sequences no longer than the positions the model was built for; GQA heads that group evenly."""
    arch, stage = cfg.model.architecture, cfg.stage
    positions = arch.max_position_embeddings
    _require(positions is None or stage.max_length <= positions,
             f"stage.max_length={stage.max_length} is beyond the {positions} positions of model {cfg.model.name} "
             f"(model.architecture.max_position_embeddings={positions}): tokens past position {positions} have no "
             f"trained position encoding. Use stage.max_length={positions} or less.")
    _require(arch.num_attention_heads % arch.num_key_value_heads == 0,
             f"model.architecture.num_key_value_heads={arch.num_key_value_heads} does not divide "
             f"model.architecture.num_attention_heads={arch.num_attention_heads}: each key/value head serves a whole "
             f"group of query heads.")


# ------------------------------------------------------------------------------------------------------------------
# Enumerated training settings, checked against the installed libraries' own lists (transformers' OptimizerNames,
# SchedulerType and AttentionInterface, TRL's DPOConfig/SFTConfig loss types). The lists are read from the
# libraries' source files, not imported: importing transformers.training_args costs seconds and pulls in
# bitsandbytes, which a run that does not use it keeps out of its process (alignment/optional.py). Where the source
# cannot be read that way the objects themselves are imported (tests/test_bad_input.py compares the two).
# ------------------------------------------------------------------------------------------------------------------


def _package_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) / relative if locations else None


@functools.lru_cache(maxsize=None)
def _source(package: str, relative: str) -> str:
    path = _package_file(package, relative)
    try:
        return path.read_text(encoding="utf-8") if path else ""
    except OSError:
        return ""


_BLOCK_END = re.compile(r"^[^\s#)\]}]", re.M)


@functools.lru_cache(maxsize=None)
def _top_level(package: str, relative: str, name: str) -> ast.stmt | None:
    """The top-level class, function or assignment `name` of a library module, parsed alone (fast), else None."""
    text = _source(package, relative)
    found = re.search(rf"^(?:class|def)\s+{re.escape(name)}\b|^{re.escape(name)}\s*[:=]", text, re.M)
    if not found:
        return None
    line_end = text.find("\n", found.start())
    end = _BLOCK_END.search(text, line_end + 1) if line_end >= 0 else None
    try:
        return ast.parse(text[found.start():end.start() if end else len(text)]).body[0]
    except SyntaxError:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            return None
        return next((node for node in tree.body if _defines(node, name)), None)


def _defines(node: ast.stmt, name: str) -> bool:
    if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
        return node.name == name
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return any(isinstance(t, ast.Name) and t.id == name for t in targets)


def _string_constants(node: ast.AST | None) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)] if node else []


def _enum_members(package: str, relative: str, class_name: str) -> dict[str, str]:
    """NAME → value of a string enum class (transformers' ExplicitEnum)."""
    node = _top_level(package, relative, class_name)
    if not isinstance(node, ast.ClassDef):
        return {}
    return {stmt.targets[0].id: stmt.value.value for stmt in node.body
            if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name)
            and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)}


def _class_field_metadata(package: str, relative: str, class_name: str, field_name: str) -> dict[str, Any]:
    """The `metadata={...}` of a dataclass field `name: T = field(...)`, literal values only."""
    node = _top_level(package, relative, class_name)
    for stmt in node.body if isinstance(node, ast.ClassDef) else []:
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == field_name
                and isinstance(stmt.value, ast.Call)):
            for keyword in stmt.value.keywords:
                if keyword.arg == "metadata":
                    try:
                        return ast.literal_eval(keyword.value)
                    except ValueError:
                        return {}
    return {}


@functools.lru_cache(maxsize=None)
def optimizer_names() -> tuple[str, ...]:
    """transformers' OptimizerNames: the values TrainingArguments(optim=...) accepts."""
    names = tuple(_enum_members("transformers", "training_args.py", "OptimizerNames").values())
    if names:
        return names
    from transformers.training_args import OptimizerNames

    return tuple(o.value for o in OptimizerNames)


@functools.lru_cache(maxsize=None)
def scheduler_names() -> tuple[str, ...]:
    """transformers' SchedulerType: the values TrainingArguments(lr_scheduler_type=...) accepts."""
    names = tuple(_enum_members("transformers", "trainer_utils.py", "SchedulerType").values())
    if names:
        return names
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)


@functools.lru_cache(maxsize=None)
def attention_names() -> tuple[str, ...]:
    """transformers' AttentionInterface registry, and eager (always there)."""
    node = _top_level("transformers", "modeling_utils.py", "AttentionInterface")
    mapping = next((stmt.value for stmt in (node.body if isinstance(node, ast.ClassDef) else [])
                    if _defines(stmt, "_global_mapping") and isinstance(stmt.value, ast.Dict)), None)
    names = [k.value for k in mapping.keys if isinstance(k, ast.Constant)] if mapping is not None else []
    if not names:
        from transformers.modeling_utils import AttentionInterface

        names = list(AttentionInterface._global_mapping)
    return ("eager", *names)


def _loss_types_from_help(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(re.findall(r"`'([a-z0-9_]+)'`", text)))


@functools.lru_cache(maxsize=None)
def loss_types(stage: str) -> tuple[str, ...]:
    """The loss types TRL's DPOConfig (its help text lists them) or SFTConfig (its field's `choices`) accepts."""
    if stage == "dpo":
        found = _loss_types_from_help(str(_class_field_metadata("trl", "trainer/dpo_config.py", "DPOConfig",
                                                                 "loss_type").get("help", "")))
        if found:
            return found
        from trl import DPOConfig

        return _loss_types_from_help(DPOConfig.__dataclass_fields__["loss_type"].metadata["help"])
    found = tuple(_class_field_metadata("trl", "trainer/sft_config.py", "SFTConfig", "loss_type").get("choices", ()))
    if found:
        return found
    from trl import SFTConfig

    return tuple(SFTConfig.__dataclass_fields__["loss_type"].metadata["choices"])


def _availability_package(function: str) -> str | None:
    """The package an `is_<x>_available` function of transformers looks for (its _is_package_available argument)."""
    node = _top_level("transformers", "utils/import_utils.py", function)
    for call in ast.walk(node) if node else []:
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "_is_package_available"
                and call.args and isinstance(call.args[0], ast.Constant)):
            return call.args[0].value
    return None


@functools.lru_cache(maxsize=None)
def optimizer_needs() -> dict[str, tuple[tuple[str, ...], bool]]:
    """Optimizer name → (the packages its transformers handler needs, whether it needs optim_target_modules), read
    from transformers/trainer_optimizer.py's dispatch table; {} where that table cannot be read."""
    members = _enum_members("transformers", "training_args.py", "OptimizerNames")

    def names(node: ast.AST) -> list[str]:  # OptimizerNames.X → its value
        return [members[n.attr] for n in ast.walk(node) if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name) and n.value.id == "OptimizerNames" and n.attr in members]

    table = _top_level("transformers", "trainer_optimizer.py", "_OPTIMIZER_HANDLERS")
    if table is None or not isinstance(getattr(table, "value", None), ast.Dict):
        return {}
    handlers: dict[str, str] = {}
    for key, value in zip(table.value.keys, table.value.values):
        if key is not None and isinstance(value, ast.Name):  # OptimizerNames.X: _get_x
            handlers.update(dict.fromkeys(names(key), value.id))
        elif key is None and isinstance(value, ast.Call) and len(value.args) == 2:  # **dict.fromkeys(_GROUP, _get_x)
            group, handler = value.args
            group_node = _top_level("transformers", "trainer_optimizer.py", getattr(group, "id", ""))
            if group_node is not None and isinstance(handler, ast.Name):
                handlers.update(dict.fromkeys(names(group_node), handler.id))
    needs = {}
    for handler in set(handlers.values()):
        node = _top_level("transformers", "trainer_optimizer.py", handler)
        packages = []
        for n in ast.walk(node) if node else []:
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and re.fullmatch(r"is_\w+_available", n.func.id):
                packages.append(_availability_package(n.func.id))
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                packages.append(n.module.split(".")[0])
        packages = tuple(dict.fromkeys(p for p in packages if p and p not in ("torch", "transformers")))
        low_rank = any(isinstance(n, ast.Name) and n.id == "_setup_low_rank_optimizer" for n in ast.walk(node)) \
            if node else False
        needs[handler] = (packages, low_rank)
    return {name: needs[handler] for name, handler in handlers.items()}


# Schedulers whose transformers function needs arguments alignment does not pass (lr_scheduler_kwargs), and those
# TrainingArguments accepts only with evaluation during training (tests/test_bad_input.py checks both lists against
# transformers).
SCHEDULERS_NEEDING_KWARGS = {"cosine_with_min_lr": "min_lr or min_lr_rate",
                             "cosine_warmup_with_min_lr": "min_lr or min_lr_rate",
                             "warmup_stable_decay": "num_decay_steps"}
SCHEDULERS_NEEDING_EVAL = ("reduce_lr_on_plateau", "greedy")
# DPO loss types TRL refuses with the settings alignment passes.
DPO_LOSS_TYPES_UNSUPPORTED = {"exo_pair": "needs label_smoothing > 0, which alignment does not set"}


def _has_eval_split(cfg: RunConfig) -> bool:
    return any(source.eval_split or source.test_size > 0 for source in cfg.dataset.sources)


def _check_training_choices(cfg: RunConfig) -> None:
    """optim, lr_scheduler_type, loss_type, attention and padding side: values the libraries accept, usable here."""
    stage = cfg.stage
    if stage.name in ("sft", "dpo"):
        _check_optimizer(stage.optim)
        _check_scheduler(cfg)
        valid = tuple(t for t in loss_types(stage.name) if t not in DPO_LOSS_TYPES_UNSUPPORTED or stage.name != "dpo")
        unsupported = DPO_LOSS_TYPES_UNSUPPORTED.get(stage.loss_type) if stage.name == "dpo" else None
        _require(stage.loss_type in valid,
                 f"stage.loss_type={stage.loss_type} is not a loss type TRL's {stage.name.upper()} trainer takes"
                 + (f" here (it {unsupported})" if unsupported else "") + f". Valid values: {', '.join(valid)}.")
    _check_attention(cfg)
    _one_of("model.tokenizer.padding_side", cfg.model.tokenizer.padding_side, ("right", "left"))
    if cfg.backend.fsdp is not None:
        _one_of("backend.fsdp.state_dict_type", cfg.backend.fsdp.state_dict_type,
                ("SHARDED_STATE_DICT", "FULL_STATE_DICT"))
    if cfg.backend.zero3 is not None:
        for part in ("optimizer", "param"):
            _one_of(f"backend.zero3.offload_{part}", getattr(cfg.backend.zero3, f"offload_{part}"), ("none", "cpu"))


def _check_optimizer(optim: str) -> None:
    valid = optimizer_names()
    _require(optim in valid, f"stage.optim={optim} is not an optimizer transformers knows. Valid values: "
                             f"{', '.join(valid)}.")
    packages, low_rank = optimizer_needs().get(optim, ((), False))
    _require(not low_rank, f"stage.optim={optim} needs optim_target_modules, which alignment does not pass. Use "
                           f"another optimizer, e.g. stage.optim=adamw_torch_fused.")
    for package in packages:
        if package == "bitsandbytes":  # imported now, so that the run keeps it (alignment/optional.py hides it else)
            require_importable(package, f"stage.optim={optim} needs bitsandbytes",
                               "Install it (`pip install bitsandbytes`) or use stage.optim=adamw_torch_fused.")
        else:
            _require(importlib.util.find_spec(package) is not None,
                     f"stage.optim={optim} needs the {package} package, which is not installed. Install it, or use "
                     f"stage.optim=adamw_torch_fused.")


def _check_scheduler(cfg: RunConfig) -> None:
    name = cfg.stage.lr_scheduler_type
    valid = scheduler_names()
    _require(name in valid, f"stage.lr_scheduler_type={name} is not a scheduler transformers knows. Valid values: "
                            f"{', '.join(v for v in valid if v not in SCHEDULERS_NEEDING_KWARGS)}.")
    _require(name not in SCHEDULERS_NEEDING_KWARGS,
             f"stage.lr_scheduler_type={name} needs {SCHEDULERS_NEEDING_KWARGS.get(name)} in lr_scheduler_kwargs, "
             f"which alignment does not pass. Use e.g. stage.lr_scheduler_type=cosine or linear.")
    _require(name not in SCHEDULERS_NEEDING_EVAL or (cfg.stage.eval_steps is not None and _has_eval_split(cfg)),
             f"stage.lr_scheduler_type={name} steps on evaluation results, so it needs evaluation during training: "
             f"set stage.eval_steps and a dataset with an eval split (dataset.eval_split or dataset.test_size), or use "
             f"another scheduler, e.g. stage.lr_scheduler_type=cosine.")


def _check_attention(cfg: RunConfig) -> None:
    name = cfg.model.attn_implementation
    if "/" in name:  # a kernel from the hub (org/repo[:function]), which transformers loads with `kernels`
        _require(importlib.util.find_spec("kernels") is not None,
                 f"model.attn_implementation={name} is a hub kernel, which needs the kernels package (`pip install "
                 f"kernels`). Or use model.attn_implementation=sdpa.")
        return
    valid = attention_names()
    _require(name in valid, f"model.attn_implementation={name} is not an attention implementation transformers "
                            f"knows. Valid values: {', '.join(valid)} (or a hub kernel, org/repo).")
    # flash_attention_2 falls back to sdpa by itself (alignment/modeling.py); the newer kernels need CUDA.
    _require(not name.startswith("flash_attention") or name == "flash_attention_2" or uses_cuda(cfg),
             f"model.attn_implementation={name} needs a CUDA device, and none is used here. Use "
             f"model.attn_implementation=sdpa (or flash_attention_2, which falls back to sdpa without CUDA).")


# ------------------------------------------------------------------------------------------------------------------
# The run dir's place: refused before anything is written, and nothing is created to find out.
# ------------------------------------------------------------------------------------------------------------------

MIN_RUN_BYTES = 32 * 2**20  # config, logs, metrics, plots, data report: what every run writes besides weights


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def parameter_floor(cfg: RunConfig) -> int:
    """A lower bound on the model's parameter count from its architecture facts alone (nothing is built): the
    attention and MLP weights of every layer (an ungated MLP, the smaller kind) and one embedding matrix."""
    arch = cfg.model.architecture
    head_dim = arch.head_dim or arch.hidden_size // arch.num_attention_heads
    attention = 2 * arch.hidden_size * head_dim * (arch.num_attention_heads + arch.num_key_value_heads)
    return arch.num_hidden_layers * (attention + 2 * arch.hidden_size * arch.intermediate_size) \
        + arch.vocab_size * arch.hidden_size


def bytes_written_at_least(cfg: RunConfig) -> tuple[int, str]:
    """A conservative (low) estimate of what the run writes into its dir, and what that is made of."""
    if cfg.data_report:
        return MIN_RUN_BYTES, "its records and data report"
    if cfg.stage.name == "eval" or cfg.peft.method != "none":
        return MIN_RUN_BYTES, "its records (an adapter or an evaluation adds little)"
    width = {"float32": 4}.get(cfg.model.dtype, 2)
    weights = parameter_floor(cfg) * width
    checkpoints = 1 if cfg.stage.max_steps == -1 or cfg.stage.save_steps <= cfg.stage.max_steps else 0
    what = (f"the trained model ({_size(weights)}: at least {_count(parameter_floor(cfg))} parameters at {width} "
            f"bytes)" + (", the same again in a checkpoint" if checkpoints else "") + " and its records")
    return weights * (1 + checkpoints) + MIN_RUN_BYTES, what


def check_run_location(cfg: RunConfig) -> None:
    """run_dir (or, unset, outputs/ under the working dir) can be created and written, with room for the run.

    The free-space check is skipped under dry_run=true: a plan is often made on another machine than the run's, and
    it prints what the run will write.
    """
    path = Path(cfg.run_dir) if cfg.run_dir else OUTPUTS_ROOT
    key = f"run_dir={cfg.run_dir}" if cfg.run_dir else f"run_dir (unset: a new dir under {Path.cwd() / OUTPUTS_ROOT})"
    try:
        _require(not path.exists() or path.is_dir(), f"{key} is a file, not a directory. Choose another run_dir.")
        anchor = path
        while not anchor.exists() and anchor != anchor.parent:
            anchor = anchor.parent
    except OSError as err:  # a parent that cannot be searched
        raise ConfigError(f"{key} cannot be reached ({err.strerror}: {err.filename}). Choose another run_dir.") from None
    _require(anchor.is_dir(), f"{key} cannot be created: {anchor} is a file, not a directory. Choose another run_dir.")
    read_only = bool(os.statvfs(anchor).f_flag & os.ST_RDONLY)
    _require(not read_only, f"{key} is on a read-only filesystem ({anchor}). Choose a run_dir on a writable one.")
    _require(os.access(anchor, os.W_OK | os.X_OK),
             f"{key} cannot be written: {anchor} is not writable by this user. Choose another run_dir, or make "
             f"{anchor} writable.")
    if cfg.dry_run:
        return
    needed, what = bytes_written_at_least(cfg)
    free = shutil.disk_usage(anchor).free
    _require(free >= needed, f"{key} has {_size(free)} free on its filesystem ({anchor}), but this run writes at least "
                             f"{_size(needed)}: {what}. Free space, or choose a run_dir on a larger filesystem.")
