"""DPO's reference model: the options, the choice `ref=auto` makes, and the precomputed log-prob cache.

- `adapter_copy`: the policy is a parent's SFT adapter on its base; a frozen copy of that adapter on the
  same base is the reference (TRL's pattern: a PeftModel with a trainable `default` adapter and no
  ref_model; the trainer adds a frozen `ref` adapter). One base in memory, quantized or not.
- `base`: the policy's base with every adapter disabled. Equal to the starting policy when the adapter is
  fresh (LoRA's B starts at zero), so it costs nothing.
- `separate`: an independent model loaded from `ref.path` (e.g. a full SFT model), frozen.
- `precomputed`: reference log-probs computed once before training and cached on disk, keyed by the
  reference weights, the prepared data (sources, settings, tokenizer and template), the split and the
  truncation; any change gives another key, so a stale cache is never read. No reference in memory
  while training, and sweeps over beta or the learning rate share one computation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from alignment.errors import ConfigError
from alignment.config.schema import RunConfig
from alignment.config.registry import stage_of

OPTIONS = ("auto", "adapter_copy", "base", "separate", "precomputed")


@dataclass(frozen=True)
class ReferenceChoice:
    option: str      # the option used
    requested: str   # what ref.name said (auto or the option itself)
    reason: str      # why, in words, for the log, the dry run and summary.json


def choose_reference(cfg: RunConfig, adapter_kept: bool) -> ReferenceChoice:
    """Resolve ref.name for this composition, or raise ConfigError when the option cannot apply (among the options
    the stage's trainer supports: its registry entry's reference_options)."""
    requested, lora = cfg.ref.name, cfg.peft.method != "none"
    options = stage_of(cfg).reference_options
    if requested not in OPTIONS:
        raise ConfigError(f"ref={requested} is not supported. Valid values: {', '.join(OPTIONS)}.")
    if requested not in options:
        raise ConfigError(f"ref={requested} is not supported by stage={cfg.stage.name}. Valid values: "
                          f"{', '.join(options)}.")
    if adapter_kept and "adapter_copy" not in options:
        raise ConfigError(f"stage={cfg.stage.name} has no frozen copy of a kept parent adapter as its reference, so "
                          f"keeping the parent's adapter would make the bare base the reference. Use "
                          f"parent_adapter=merge (the merged SFT model is then the reference).")
    if requested == "auto":
        if adapter_kept:
            return ReferenceChoice("adapter_copy", requested, "the policy starts from the parent's adapter: a frozen "
                                   "copy of it on the same base is the reference, with no second base in memory")
        if lora:
            return ReferenceChoice("base", requested, "a fresh adapter starts at zero, so the base with the adapter "
                                   "disabled is exactly the starting policy, at no memory cost")
        return ReferenceChoice("precomputed", requested, "full fine-tuning: reference log-probs are computed once "
                               "before training and cached, instead of holding a second full model in memory")
    if requested == "adapter_copy" and not adapter_kept:
        raise ConfigError(
            "ref=adapter_copy needs a policy that starts from a parent run's LoRA adapter (parent_run=<an SFT run "
            "trained with peft=lora or qlora>, parent_adapter=keep or auto, and peft=lora or qlora here). With a "
            "fresh adapter the reference is the base: use ref=base (or ref=auto).")
    if requested == "base" and not lora:
        raise ConfigError(
            "ref=base disables the LoRA adapter to get the reference, but peft=none trains every weight. Use "
            "ref=precomputed or ref=separate ref.path=<model>, or peft=lora.")
    if requested == "separate" and not cfg.ref.path:
        raise ConfigError(
            "ref=separate needs ref.path: the directory (or hub id) of the reference model, e.g. "
            "ref.path=outputs/<date>/<run>/1-sft/model. Or let ref=auto pick an option that needs no path.")
    return ReferenceChoice(requested, requested, "as configured")


def precompute_key(data_key: str, split: str, cfg: RunConfig) -> str:
    """What, besides the reference weights, decides the reference log-probs of one split.

    data_key fingerprints the prepared rows (sources, row settings, tokenizer and chat template, prompt
    budget); TRL truncates in its collator, so max_length and the truncation side are added here. TRL
    combines this with a hash of the reference weights to name the cache file.
    """
    import trl

    spec = {"data": data_key, "split": split, "max_length": cfg.stage.max_length, "truncation": "keep_start",
            "trl": trl.__version__}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
