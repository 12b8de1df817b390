"""Every int and float setting, finite and inside its range: found by walking the typed RunConfig dataclasses."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from typing import Any, Iterator

from alignment.errors import ConfigError, require
from alignment.config.schema import RunConfig


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
    """The range of a field: NUMBER_RANGES, or a stage config's own `number_ranges` (its module states them)."""
    for cls in owner.__mro__:
        found = NUMBER_RANGES.get(cls.__name__, {}).get(name) or vars(cls).get("number_ranges", {}).get(name)
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
        require(rule is None or rule.admits(value), f"{setting.key} must be {described} (got {value}).{note}")
