"""Where a stage's weights come from, and the lineage that records it.

A stage starts from a tiny twin, the configured model (hub id or local dir), or a finished parent run.
A parent that saved a full model is loaded as is. A parent that saved a LoRA adapter is either kept
(`parent_adapter=keep`: the adapter, on its base, is this stage's trainable policy, and `ref=adapter_copy`
can use a frozen copy of it as the reference) or merged into its base first (`parent_adapter=merge`, as
the handbook does before DPO), into `<run_dir>/merged_parent/`, which then behaves like a full model.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from alignment.errors import ConfigError
from alignment.config.schema import RunConfig
from alignment.records.rundir import RunDir, read_summary
from alignment.models.checkpoint import forget_read_configs
from alignment.models.gguf_checkpoint import ensure_converted, gguf_origin
from alignment.models.modeling import torch_dtype
from alignment.models.source import model_source
from alignment.models.tiny import ensure_tiny_model

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
MERGED_DIR = "merged_parent"


@dataclass(frozen=True)
class StartingPoint:
    kind: str                       # "tiny twin" | "model" | "parent model" | "parent adapter" | "merged parent adapter"
    weights: Path | str             # full weights this stage loads (for an adapter: its base)
    adapter: Optional[Path] = None  # a kept parent adapter, loaded trainable on top of `weights`
    tokenizer: Path | str = ""      # where the tokenizer is read from

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).exists() and not (path / "config.json").exists()


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter was trained on, as recorded by peft in adapter_config.json."""
    base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter_dir / ADAPTER_CONFIG} names no base_model_name_or_path, so the adapter "
                          f"cannot be loaded. Re-save it with peft, or merge it into its base yourself.")
    return base


def keeps_parent_adapter(cfg: RunConfig, parent_is_adapter: bool) -> bool:
    """auto keeps the adapter when this stage trains LoRA too, and merges it when it trains every weight."""
    if not parent_is_adapter:
        return False
    if cfg.parent_adapter == "auto":
        return cfg.peft.method != "none"
    return cfg.parent_adapter == "keep"


def parent_is_adapter(cfg: RunConfig, previous: RunConfig | None = None) -> bool:
    """Whether the parent run saved an adapter: read from its model dir, or, for a chain link whose
    parent has not run yet, from the previous link's peft setting."""
    if not cfg.parent_run:
        return False
    model = RunDir(Path(cfg.parent_run)).model
    if model.exists():
        return is_adapter_dir(model)
    return previous is not None and previous.peft.method != "none"


def resolve_start(cfg: RunConfig) -> StartingPoint:
    """The starting point without side effects (a merge is planned, not done): for dry runs and data reports."""
    if cfg.parent_run:
        model = RunDir(Path(cfg.parent_run).resolve()).model  # absolute: an adapter trained on it records it
        if is_adapter_dir(model):
            base = adapter_base_path(model, cfg)
            if keeps_parent_adapter(cfg, True):
                return StartingPoint("parent adapter", base, adapter=model, tokenizer=model)
            merged = Path(cfg.run_dir) / MERGED_DIR if cfg.run_dir else model
            return StartingPoint("merged parent adapter", merged, adapter=None, tokenizer=model)
        return StartingPoint("parent model", model, tokenizer=model)
    if cfg.model.name_or_path is None:

        path = ensure_tiny_model(cfg.model, cfg.seed)
        return StartingPoint("tiny twin", path, tokenizer=path)
    weights = model_weights(cfg)
    return StartingPoint("model", weights, tokenizer=weights)


def model_weights(cfg: RunConfig) -> Path | str:
    """What from_pretrained loads for the configured checkpoint: an absolute dir (a GGUF file's converted
    checkpoint, built on first use) or a hub id, so an adapter trained on it records a base that loads anywhere."""

    source = model_source(cfg.model.name_or_path, cfg.model.gguf_file)
    if source.gguf_file:
        converted = ensure_converted(source)
        forget_read_configs()  # the config is now read from the converted dir
        return converted
    return Path(source.reference) if source.local else source.reference


def adapter_base_path(adapter_dir: Path, cfg: RunConfig) -> Path | str:
    """The adapter's base as something from_pretrained loads from here: an absolute dir or a hub id."""
    base = adapter_base(adapter_dir)
    if (Path(base).expanduser() / "config.json").exists():
        return Path(base).expanduser().resolve()  # runs saved before bases were recorded absolute
    if cfg.model.tiny:
        # The twin cache was cleared or moved: the same config and seed rebuild identical weights.

        return ensure_tiny_model(cfg.model, cfg.seed)
    return base


def prepare_start(cfg: RunConfig) -> StartingPoint:
    """The starting point, with a parent adapter merged into its base when that is the plan."""
    start = resolve_start(cfg)
    if start.kind != "merged parent adapter":
        return start
    target = Path(start.weights)
    if not (target / "config.json").exists():
        merge_adapter(Path(start.tokenizer), target, cfg)
    return start


def merge_adapter(adapter_dir: Path, target: Path, cfg: RunConfig) -> Path:
    """Fold a LoRA adapter into a full-precision copy of its base and save it (with the tokenizer) to target.

    The base is loaded unquantized even when the adapter was trained with QLoRA: merging into 4-bit
    weights would round the update away; the merged model is quantized again on load if this stage uses QLoRA.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer


    base_path = adapter_base_path(adapter_dir, cfg)
    log.info("merging the adapter in %s into its base %s → %s", adapter_dir, base_path, target)
    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch_dtype(cfg.model.dtype))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted merge
    merged.save_pretrained(staging)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(staging)
    staging.rename(target)
    return target


def lineage(cfg: RunConfig, start: StartingPoint) -> dict[str, Any]:
    """What summary.json records about where this stage's weights came from, ancestors first, back to the
    original base (and the GGUF file it was converted from)."""

    ancestors: list[dict[str, Any]] = []
    parent_lineage: dict[str, Any] = {}
    if cfg.parent_run:
        parent = read_summary(Path(cfg.parent_run)) or {}
        parent_lineage = parent.get("lineage") or {}
        ancestors = list(parent_lineage.get("ancestors", []))
        ancestors.append({
            "run_dir": str(Path(cfg.parent_run).resolve()),
            "stage": parent.get("stage"),
            "model": str(RunDir(Path(cfg.parent_run)).model.resolve()),
            "saved": "adapter" if start.kind in ("parent adapter", "merged parent adapter") else "full model",
        })
    return {
        "ancestors": ancestors,
        "start": start.kind,
        "weights": str(start.weights),
        "adapter": str(start.adapter) if start.adapter else None,
        # The model the lineage began with: the first ancestor's, else this stage's own starting weights.
        "base_model": parent_lineage.get("base_model") or str(start.weights),
        "gguf_source": parent_lineage.get("gguf_source") or gguf_origin(start.weights),
    }
