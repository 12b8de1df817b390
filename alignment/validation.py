"""Checks a RunConfig before anything heavy runs; each failure names the key and what to do."""

from __future__ import annotations

import os
from pathlib import Path

from .config import DATASET_FORMAT_FOR_STAGE, STAGES, ConfigError, RunConfig
from .data import SCHEMAS, check_sources, source_key
from .data.loading import settings_error
from .data.schemas import PROBLEM_KINDS
from .modeling import check_model_source
from .rundir import RunDir, check_run_dir, is_finished

_DTYPES = ("float32", "bfloat16", "float16", "auto")
_PRECISIONS = ("auto", "no", "bf16", "fp16")
_DEVICES = ("auto", "cpu", "cuda")
_BACKENDS = ("single",)
_PEFT_METHODS = ("none", "lora", "qlora")
_QUANT_TYPES = ("nf4", "fp4")


def is_offline(cfg: RunConfig) -> bool:
    return cfg.offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(key: str, value: object, valid: tuple[str, ...]) -> None:
    _require(value in valid, f"{key}={value} is not supported. Valid values: {', '.join(valid)}.")


def validate(cfg: RunConfig, parent_created_by_chain: bool = False) -> None:
    """Raise ConfigError on the first problem. Filesystem checks are cheap; nothing is loaded."""
    stage = cfg.stage
    _one_of("stage.name", stage.name, STAGES)
    _require(cfg.beta > 0, f"beta must be > 0 (got {cfg.beta}). It scales DPO's implicit reward; "
                           f"typical values are 0.01-0.5, e.g. beta=0.1.")
    _require(cfg.learning_rate > 0, f"learning_rate must be > 0 (got {cfg.learning_rate}), e.g. learning_rate=5e-7 "
                                    f"for DPO or 2e-5 for SFT.")
    _require(stage.max_steps == -1 or stage.max_steps > 0,
             f"stage.max_steps must be -1 (train for num_train_epochs) or > 0 (got {stage.max_steps}).")
    _require(stage.num_train_epochs > 0, f"stage.num_train_epochs must be > 0 (got {stage.num_train_epochs}).")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "save_steps"):
        _require(getattr(stage, key) >= 1, f"stage.{key} must be >= 1 (got {getattr(stage, key)}).")
    _require(stage.max_length >= 16, f"stage.max_length must be >= 16 tokens (got {stage.max_length}).")
    _require(0 <= stage.warmup_ratio < 1, f"stage.warmup_ratio must be in [0, 1) (got {stage.warmup_ratio}).")
    _require(stage.eval_steps is None or stage.eval_steps >= 1,
             f"stage.eval_steps must be null or >= 1 (got {stage.eval_steps}).")

    _require(stage.max_prompt_length is None or 1 <= stage.max_prompt_length < stage.max_length,
             f"stage.max_prompt_length must be null or in [1, stage.max_length) (got {stage.max_prompt_length} with "
             f"max_length {stage.max_length}): a prompt must leave room for the response.")
    _check_dataset(cfg)

    _one_of("model.dtype", cfg.model.dtype, _DTYPES)
    _one_of("backend.name", cfg.backend.name, _BACKENDS)
    _one_of("backend.device", cfg.backend.device, _DEVICES)
    _one_of("backend.mixed_precision", cfg.backend.mixed_precision, _PRECISIONS)
    _one_of("peft.method", cfg.peft.method, _PEFT_METHODS)
    _require(cfg.peft.method == "none" or cfg.peft.r >= 1, f"peft.r must be >= 1 (got {cfg.peft.r}).")
    if cfg.peft.method == "qlora":
        _check_qlora(cfg)
    if not cfg.dry_run:
        _check_devices(cfg)

    if cfg.parent_run and not parent_created_by_chain:
        _check_parent(Path(cfg.parent_run))
    if cfg.dry_run:
        return  # a dry run loads nothing, so missing weights or data are reported in the plan, not refused
    if not cfg.parent_run:
        check_model_source(cfg.model, is_offline(cfg))
    check_sources(cfg.dataset, is_offline(cfg))
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
        _require(fmt == wanted,
                 f"stage={cfg.stage.name} trains on {wanted} data, but {key} ({source.name}) has schema "
                 f"{source.schema}, which holds {fmt} data. Pick a matching dataset, e.g. "
                 f"{'dataset=ultrachat_200k' if wanted == 'chat' else 'dataset=ultrafeedback_binarized'} "
                 f"(or dataset=tiny_{cfg.stage.name} offline).")
    for problem in PROBLEM_KINDS:
        _one_of(f"dataset.bad_rows.{problem}", getattr(dataset.bad_rows, problem), ("fail", "drop"))
    _one_of("dataset.lint", dataset.lint, ("fail", "warn", "off"))
    _require(dataset.lint_rows >= 0, f"dataset.lint_rows must be >= 0 (got {dataset.lint_rows}).")
    _require(dataset.num_proc is None or dataset.num_proc >= 1,
             f"dataset.num_proc must be null or >= 1 (got {dataset.num_proc}).")


def _check_qlora(cfg: RunConfig) -> None:
    peft = cfg.peft
    _one_of("peft.quant_type", peft.quant_type, _QUANT_TYPES)
    _one_of("peft.compute_dtype", peft.compute_dtype, ("bfloat16", "float16", "float32"))
    _one_of("peft.quant_storage", peft.quant_storage, ("bfloat16", "float16", "float32", "uint8"))
    if cfg.dry_run:
        return
    try:
        import bitsandbytes  # noqa: F401 - 4-bit layers come from here
    except Exception as err:  # ImportError, or a broken native library
        raise ConfigError(
            f"peft=qlora needs bitsandbytes with 4-bit support on this machine, and it cannot be imported "
            f"({type(err).__name__}: {err}). Install it (`pip install bitsandbytes`; CUDA, or its CPU backend), or "
            f"use peft=lora.") from None


def _check_devices(cfg: RunConfig) -> None:
    import torch

    cuda = torch.cuda.is_available() and cfg.backend.device != "cpu"
    _require(cfg.backend.device != "cuda" or torch.cuda.is_available(),
             "backend.device=cuda but no CUDA device is visible. Use backend.device=auto or cpu.")
    _require(cuda or cfg.backend.mixed_precision in ("auto", "no"),
             f"backend.mixed_precision={cfg.backend.mixed_precision} needs a CUDA device; on CPU use "
             f"backend.mixed_precision=no (or auto).")


def _check_parent(parent: Path) -> None:
    _require(parent.is_dir(), f"parent_run={parent} does not exist. Point it at a finished SFT run dir.")
    _require(is_finished(parent), f"parent_run={parent} is not a finished run (summary.json status is not "
                                  f"'finished'). Finish or resume it first.")
    model = RunDir(parent).model
    _require((model / "config.json").exists(),
             f"parent_run={parent} has no full model in {model} (a LoRA adapter cannot be a starting point "
             f"yet). Run the parent stage with peft=none.")
