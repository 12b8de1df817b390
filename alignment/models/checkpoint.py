"""What `model.name_or_path` points at, and the architecture facts read from it, decided once at composition.

A model is either a tiny twin (a twin preset with no `name_or_path`: built offline from its `architecture`)
or a checkpoint: a local Hugging Face model dir, a hub id (read from the local HF cache; composition never
touches the network), or a GGUF file (a path ending in .gguf, or `model.gguf_file` inside a dir). For a
checkpoint the facts come from its config.json, read with the real transformers config class:

- a twin preset given a checkpoint trains that checkpoint: the twin's recipe does not describe it, so the
  facts (and the run name) are the checkpoint's, and the log says so;
- any other preset's facts are claims about its checkpoint: one that disagrees is refused (exit 2) before
  anything is written; facts it leaves out are filled from the checkpoint;
- a hub id that is not in the local cache keeps the preset's facts (a dry run plans it offline); with no
  facts to keep, the run is refused with what to do.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from alignment.errors import ConfigError
from alignment.models.gguf_checkpoint import converted_dir
from alignment.models.source import ModelSource, model_source

log = logging.getLogger(__name__)

# Facts every model must have (the planner and the checks read them); the others may be null.
REQUIRED_FACTS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "vocab_size")
OPTIONAL_FACTS = ("max_position_embeddings", "tie_word_embeddings", "rope_theta", "rms_norm_eps", "sliding_window",
                  "head_dim")


def read_config(source: ModelSource, key: str = "model.name_or_path"):
    """The checkpoint's transformers config, or None for a hub id not in the local cache. Refuses what no causal
    LM can be trained from: a missing dir or file, an adapter dir, an unreadable GGUF, a non-causal-LM model."""
    config = _read_config(source, key)
    if config is not None:
        check_causal_lm(config, source, key)
    return config


@functools.lru_cache(maxsize=16)
def _read_config(source: ModelSource, key: str):
    from transformers import AutoConfig

    if not source.local:
        try:
            return AutoConfig.from_pretrained(source.reference, local_files_only=True, **source.load_kwargs())
        except (OSError, ValueError):
            return None  # not in the local cache: from_pretrained downloads it when the run is online
    directory = Path(source.reference)
    if source.gguf_file:

        converted = converted_dir(source)
        if converted is not None:  # read from the converted checkpoint: no 100 MB file to parse again
            return AutoConfig.from_pretrained(str(converted))
        if not (directory / source.gguf_file).is_file():
            raise ConfigError(f"{key}={source.given}: no such GGUF file ({source.label}). Give the path of a .gguf file "
                              f"(or its dir in {key} and its name in model.gguf_file).")
        try:
            return AutoConfig.from_pretrained(str(directory), gguf_file=source.gguf_file)
        except Exception as err:  # gguf's reader and transformers raise ValueError, KeyError, OSError, ...
            raise ConfigError(f"{key}={source.given}: transformers cannot read this GGUF file "
                              f"({type(err).__name__}: {_one_line(err)}). Check that it is a complete GGUF model file "
                              f"of an architecture transformers supports, and that the `gguf` package is installed "
                              f"(pip install -e \".[smol]\").") from None
    if not directory.is_dir():
        raise ConfigError(f"{key}={source.given} does not exist ({directory}). Point it at a model dir (config.json and "
                          f"weights, as save_pretrained writes them), a .gguf file or a hub id.")
    if not (directory / "config.json").is_file():
        what = ("a LoRA adapter (adapter_config.json): train from its run with parent_run=<run dir>, or merge it first"
                if (directory / "adapter_config.json").exists() else "not a model dir: it has no config.json")
        raise ConfigError(f"{key}={source.given} is {what}. Point it at a model dir saved with save_pretrained.")
    try:
        return AutoConfig.from_pretrained(str(directory))
    except Exception as err:
        raise ConfigError(f"{key}={source.given}: transformers cannot read its config.json "
                          f"({type(err).__name__}: {_one_line(err)}).") from None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


def check_causal_lm(config, source: ModelSource, key: str = "model.name_or_path") -> None:
    """The config must load as a causal LM, and the checkpoint's own architectures (when it names any) must be
    causal-LM classes: BERT has a causal-LM class, but a BertForMaskedLM checkpoint is an encoder."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    named = getattr(config, "architectures", None) or []
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or (named and not set(named) & causal_classes):
        architectures = ", ".join(named) or "none named"
        raise ConfigError(f"{key}={source.given or source.label} holds a {config.model_type} model (architectures: {architectures}), "
                          f"which transformers cannot load as a causal language model (AutoModelForCausalLM). SFT and "
                          f"DPO train decoder-only causal LMs: point {key} at one.")


def facts_of(config) -> dict[str, Any]:
    """The architecture facts of a transformers config, by the names ArchitectureConfig uses."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(text, "rope_parameters", None) or {}
    facts = {
        "model_type": config.model_type,
        "hidden_size": getattr(text, "hidden_size", None),
        "num_hidden_layers": getattr(text, "num_hidden_layers", None),
        "num_attention_heads": getattr(text, "num_attention_heads", None),
        "num_key_value_heads": getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", None),
        # MLP width under the names architectures use for it; GPT-2's n_inner=None means 4 × hidden.
        "intermediate_size": next((v for v in (getattr(text, k, None) for k in
                                   ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")) if v), None)
        or 4 * getattr(text, "hidden_size", 0),
        "vocab_size": getattr(text, "vocab_size", None),
        "max_position_embeddings": getattr(text, "max_position_embeddings", None),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "rope_theta": rope.get("rope_theta") if isinstance(rope, dict) else None,
        "rms_norm_eps": getattr(text, "rms_norm_eps", None),
        "sliding_window": getattr(text, "sliding_window", None),
        "head_dim": getattr(text, "head_dim", None),
    }
    if facts["rope_theta"] is None:
        facts["rope_theta"] = getattr(text, "rope_theta", None)
    return facts


def fact_differences(declared: dict[str, Any], actual: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(fact, declared, actual) for every declared fact the checkpoint contradicts (floats to 1e-6 relative,
    since GGUF stores them in float32)."""
    wrong = []
    for name, value in declared.items():
        if value is None or name not in actual:
            continue
        other = actual[name]
        same = (math.isclose(float(value), float(other), rel_tol=1e-6)
                if isinstance(value, float) and isinstance(other, (int, float)) else value == other)
        if not same:
            wrong.append((name, value, other))
    return wrong


def derived_name(source: ModelSource) -> str:
    """A run-name-safe short name for a checkpoint: its dir, GGUF file stem or hub repo name."""
    stem = Path(source.gguf_file).stem if source.gguf_file else Path(source.reference).name or source.reference
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-") or "model"


def resolve_model(merged: DictConfig, composed: DictConfig) -> None:
    """Fill `model` of a config merged onto the schema in place: a twin keeps its recipe, a checkpoint gets its
    own facts. `composed` is the config before the merge (where `???` is still visible as missing)."""
    model = merged.model
    declared_keys = _declared_facts(merged)
    name_or_path = model.name_or_path
    if name_or_path is None:
        if not model.tiny or OmegaConf.is_missing(composed.model, "name_or_path"):
            raise ConfigError("model.name_or_path is mandatory and has no value: give a local model dir, a .gguf "
                              "file or a hub id (model.name_or_path=...), or pick a model preset (model=...).")
        _require_facts(merged, declared_keys)
        return
    source = model_source(str(name_or_path), model.gguf_file)
    config = read_config(source)
    if source.local:  # recorded absolute: config.yaml and every rank mean the same checkpoint from any directory
        model.name_or_path = str(Path(source.reference) / source.gguf_file) if source.given.endswith(".gguf") \
            else source.reference
    if model.tiny:
        # A twin preset pointed at a checkpoint: the twin's facts are its build recipe, not claims about this one.
        if config is None:
            raise _not_cached(source, list(REQUIRED_FACTS), model.name)
        log.info("model.name_or_path=%s given: training that checkpoint (%s), not the %s twin", source.label,
                 config.model_type, model.name)
        model.tiny = False
        model.name = derived_name(source)
        for name, value in facts_of(config).items():  # every fact, so none of the twin's remains
            OmegaConf.update(model, f"architecture.{name}", value, merge=False)
        return
    if config is None:
        missing = [k for k in REQUIRED_FACTS if k not in declared_keys]
        if missing:
            raise _not_cached(source, missing, model.name)
        return  # a hub id not cached: the preset's facts plan it; from_pretrained checks them on load
    actual = facts_of(config)
    declared = {k: OmegaConf.select(model, f"architecture.{k}") for k in declared_keys}
    wrong = fact_differences(declared, actual)
    if wrong:
        details = "; ".join(f"{k}: {d} in the preset, {a} in its config" for k, d, a in wrong)
        raise ConfigError(f"model={model.name} does not describe {source.label} ({details}). Fix the preset's "
                          f"model.architecture, or drop the facts from it (they are read from the checkpoint), or "
                          f"point model.name_or_path at the checkpoint the preset describes.")
    for name, value in actual.items():
        if name not in declared_keys:
            OmegaConf.update(model, f"architecture.{name}", value, merge=False)


def _declared_facts(merged: DictConfig) -> list[str]:
    """The architecture facts the composed config states (optional facts are null when not stated)."""
    missing = {k.split(".")[-1] for k in OmegaConf.missing_keys(merged) if k.startswith("model.architecture.")}
    raw = OmegaConf.to_container(merged.model.architecture, throw_on_missing=False) or {}
    return [k for k in REQUIRED_FACTS if k not in missing] + [k for k in OPTIONAL_FACTS if raw.get(k) is not None]


def _require_facts(merged: DictConfig, declared: list[str]) -> None:
    missing = [k for k in REQUIRED_FACTS if k not in declared]
    if missing:
        name = OmegaConf.select(merged, "model.name", default="?", throw_on_missing=False)
        raise ConfigError(
            f"model {name} is a twin preset (model.tiny=true) missing architecture facts: {', '.join(missing)}. A "
            f"twin is built from them; give them, or set model.name_or_path to a checkpoint to train that instead.")


def _not_cached(source: ModelSource, missing: list[str], preset: str) -> ConfigError:
    return ConfigError(
        f"model {preset} is missing architecture facts: {', '.join(missing)}, and model.name_or_path="
        f"{source.reference} is a hub id that is not in the local Hugging Face cache to read them from. Download it (`huggingface-cli download "
        f"{source.reference}`, on a connected machine: the cache is then used offline), point model.name_or_path at "
        f"a local copy, or use a preset that describes it.")


def forget_read_configs() -> None:
    """Drop the configs read so far (a GGUF source's is read from its converted dir once that exists)."""
    _read_config.cache_clear()
