"""Direct preference optimisation with TRL's DPOTrainer, with the reference option chosen by alignment.reference."""

from __future__ import annotations

import copy
import logging

from ..config import RunConfig
from ..modeling import load_model
from ..reference import choose_reference, precompute_key
from ..rundir import RunDir
from ..start import StartingPoint
from . import common

log = logging.getLogger(__name__)


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
            from ..cache import adding_derived_files

            with adding_derived_files(getattr(self, "prepared_data_dir", None), self.accelerator.is_main_process,
                                      "reference log-probs", checked=self.accelerator.wait_for_everyone):
                return super()._precompute_ref_logps(dataset, name, batch_size)

        def compute_ref_log_probs(self, model, inputs):
            self.reference_forward_batches += 1
            return super().compute_ref_log_probs(model, inputs)

    return DPOTrainerWithReferenceCache


def build_trainer(cfg: RunConfig, run: RunDir, start: StartingPoint, callbacks=()):
    from trl import DPOConfig

    choice = choose_reference(cfg, adapter_kept=start.has_adapter)
    log.info("reference model: %s (%s: %s)", choice.option, "chosen by ref=auto" if choice.requested == "auto"
             else "ref", choice.reason)

    def reference_arguments(data) -> dict:
        # Loaded after the data checks, so bad rows never cost a model load.
        ref_model = load_model(cfg.ref.path, cfg) if choice.option == "separate" else None
        return {"ref_model": ref_model, "data_key": data.report["fingerprint"], "run_config": cfg}

    trainer = common.build_trainer(
        cfg, run, start, callbacks, DPOConfig, _trainer_class(), reference_arguments,
        beta=cfg.beta,
        loss_type=[cfg.stage.loss_type],
        precompute_ref_log_probs=choice.option == "precomputed",
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
    return summary
