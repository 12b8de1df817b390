"""Direct preference optimisation with TRL's DPOTrainer, with the reference option chosen by alignment.plan.reference."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import ClassVar

from alignment.config.schema import PreferenceStageConfig, RunConfig
from alignment.models.modeling import load_model
from alignment.preflight.ranges import Range
from alignment.plan.reference import precompute_key
from alignment.plan.resolved import plan_of
from alignment.records.rundir import RunDir
from alignment.models.start import StartingPoint
from alignment.config.registry import Stage, register
from alignment.records.cache import adding_derived_files

log = logging.getLogger(__name__)


@dataclass
class DPOStageConfig(PreferenceStageConfig):
    beta: float = 0.1                # strength of the KL anchor to the reference (set with the short key `beta`)
    # TRL's DPO losses (sweepable like beta): sigmoid (the paper's), ipo, hinge, robust, apo_zero, apo_down, ...
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0     # robust: assumed share of flipped labels, in [0, 0.5); exo_pair: > 0
    # Each batch's sequences packed into one row, with restarting positions and attention kept inside each sequence
    # (alignment/stages/padding_free.py): no padding is computed; per-sequence log-probs equal the padded path's.
    padding_free: bool = False

    number_ranges: ClassVar[dict[str, Range]] = {
        "beta": Range(0, low_open=True, note=" It scales DPO's implicit reward; typical values are 0.01-0.5, e.g. "
                                             "beta=0.1 (for loss_type=ipo it is IPO's tau)."),
        "label_smoothing": Range(0, 0.5, high_open=True),
    }


def _trainer_class():
    from trl import DPOTrainer

    class DPOTrainerWithReferenceCache(DPOTrainer):
        """TRL's DPOTrainer whose precomputed reference log-probs are keyed by our data fingerprint.

        TRL names its cache file after the tokenized dataset's fingerprint and a hash of the reference
        weights. Its collator truncates to max_length after tokenization, so that fingerprint does not see
        max_length; here the dataset handed to TRL carries `precompute_key` (prepared data, split,
        truncation) instead, which also stays the same across runs that differ only in beta or the
        learning rate. `reference_forward_batches` counts the reference passes actually run.
        """

        def __init__(self, *args, data_key: str, run_config: RunConfig, **kwargs):
            self.data_key, self.run_config = data_key, run_config
            self.reference_forward_batches = 0
            self.reference_caches: dict[str, str] = {}
            super().__init__(*args, **kwargs)
            if run_config.stage.padding_free:  # on top of the fused LM head TRL has just installed
                from peft import PeftModel

                from alignment.stages.padding_free import add_padding_free_forward

                policy = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
                add_padding_free_forward(policy)
                if self.ref_model is not None:
                    add_padding_free_forward(self.ref_model)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            from datasets.fingerprint import Hasher

            keyed = copy.copy(dataset)
            keyed._fingerprint = precompute_key(self.data_key, name, self.run_config)
            before = self.reference_forward_batches
            result = self._precompute_under_lock(keyed, name, batch_size)
            cache_file = keyed._get_cache_file_path(Hasher.hash((keyed._fingerprint, self._precompute_model_hash)))
            reused = self.reference_forward_batches == before
            self.reference_caches[name] = cache_file
            log.info("reference log-probs for %s: %s %s", name, "reused from" if reused else "computed into", cache_file)
            return result

        def _precompute_under_lock(self, dataset, name, batch_size):
            """TRL's precompute, with the prepared-data entry locked by the main process: a cached file that fails
            verification is removed (and computed again), a new one is listed with its checksum, and concurrent
            runs compute the same log-probs once. The other ranks wait until the main process has checked the
            cache, so every rank sees the same file (or none) and all take part in the computation together."""

            import torch

            # The pass iterates a DataLoader, which draws its base seed from the global RNG: without the fork, a run
            # that computes the log-probs trains on other random numbers than one that finds them cached.
            cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=cuda), adding_derived_files(
                    getattr(self, "prepared_data_dir", None), self.accelerator.is_main_process, "reference log-probs",
                    checked=self.accelerator.wait_for_everyone):
                return super()._precompute_ref_logps(dataset, name, batch_size)

        def compute_ref_log_probs(self, model, inputs):
            self.reference_forward_batches += 1
            return super().compute_ref_log_probs(model, inputs)

    return DPOTrainerWithReferenceCache


def build_trainer(cfg: RunConfig, run: RunDir, start: StartingPoint, callbacks=()):
    # The trainer stack (transformers, peft, trl) loads when a run trains, not when a command is composed.
    from alignment.stages import common

    from trl import DPOConfig

    choice = plan_of(cfg).reference
    log.info("reference model: %s (%s: %s)", choice.option, "chosen by ref=auto" if choice.requested == "auto"
             else "ref", choice.reason)

    def reference_arguments(data) -> dict:
        # Loaded after the data checks, so bad rows never cost a model load.
        ref_model = load_model(cfg.ref.path, cfg) if choice.option == "separate" else None
        return {"ref_model": ref_model, "data_key": data.report["fingerprint"], "run_config": cfg}

    trainer = common.build_trainer(
        cfg, run, start, callbacks, DPOConfig, _trainer_class(), reference_arguments,
        beta=cfg.stage.beta,
        loss_type=[cfg.stage.loss_type],
        label_smoothing=cfg.stage.label_smoothing,
        precompute_ref_log_probs=choice.option == "precomputed",
        packed_row=cfg.stage.padding_free,
    )
    model = trainer.model
    if choice.option == "base" and "ref" in getattr(model, "peft_config", {}):
        # TRL copies a kept adapter as the frozen "ref" adapter; ref=base asks for the bare base instead.
        model.delete_adapter("ref")
    trainer.reference = {"option": choice.option, "requested": choice.requested, "reason": choice.reason,
                         "path": cfg.ref.path if choice.option == "separate" else None}
    return trainer


def reference_summary(trainer) -> dict:
    """What summary.json records about the reference: the option, and for precomputed the cache and reuse."""
    summary = dict(trainer.reference)
    if summary["option"] == "precomputed":
        summary.update(caches=trainer.reference_caches, forward_batches=trainer.reference_forward_batches,
                       reused=trainer.reference_forward_batches == 0)
    return {"reference": summary}


def initial_loss(stage_config) -> float | None:
    """The DPO-family loss at policy = reference (every log-ratio 0), where it has a closed form."""
    beta = stage_config.beta
    return {
        "sigmoid": math.log(2),                      # -log σ(0)
        "robust": math.log(2),                       # ((1-ε) - ε) ln 2 / (1 - 2ε)
        "hinge": 1.0,                                # relu(1 - 0)
        "ipo": (1 / (2 * beta)) ** 2,                # (0 - 1/(2β))²
        "apo_zero": 1.0,                             # (1 - σ(0)) + σ(0)
        "apo_down": 1.0,                             # σ(0) + (1 - σ(0))
    }.get(stage_config.loss_type)


STAGE = register(Stage(
    name="dpo", loss_types_from=("trainer/dpo_config.py", "DPOConfig"), config=DPOStageConfig, description="direct preference optimisation against a reference model",
    trainer="trl.DPOTrainer", data_format="preference", build_trainer=build_trainer, reference=True,
    sequences_per_example=2,  # chosen and rejected forwarded together
    logit_bytes_per_vocab_entry=0,  # TRL's DPO trainer uses a tiled LM head and keeps no full logits
    preference_metrics=True, initial_loss=initial_loss, summarize=reference_summary,
))
