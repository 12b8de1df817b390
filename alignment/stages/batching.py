"""Which examples share a micro batch, and how much of what the model computes is padding.

Preference data is ragged: a pair's chosen and rejected sequences are padded to the longest sequence of the
batch, so random batches of a dataset like ultrafeedback compute mostly padding (bench/padding.py measures it).
Length-aware batching feeds transformers' `LengthGroupedSampler` with each example's padded length (for a pair:
prompt plus the longer answer, cut at max_length, which is what TRL's collator pads to): indices are shuffled,
cut into mega-batches of up to 50 optimizer batches (transformers: at most a quarter of the epoch, so fewer on a
small dataset), and sorted by length inside each, so the batches of a step hold examples of similar length while the
order across mega-batches stays random and every example is still seen once per epoch. What it changes: a batch is
no longer an i.i.d. draw within its mega-batch (long examples train together), and the batch with the longest
example comes first, so an out-of-memory error shows at step 1.
`stage.batching=random` keeps TRL's own sampler, for step-by-step parity with a plain-TRL script.

The tally counts, per training micro batch, the real tokens (attention mask) and the tokens the model computes
(the padded batch, or the packed row with stage.padding_free); summary.json records both and their ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignment.errors import ConfigError


def _lengths(dataset, column: str):
    """Token counts of a list column, read from Arrow without building Python lists of every token."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")[column]).to_numpy(zero_copy_only=False)


def padded_lengths(dataset, max_length: int | None) -> list[int]:
    """Per example, the length the trainer's collator pads it to, from the columns TRL's tokenization writes."""
    import numpy as np

    columns = set(dataset.column_names)
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= columns:      # DPO: prompt + the longer answer
        lengths = _lengths(dataset, "prompt_ids") + np.maximum(_lengths(dataset, "chosen_ids"),
                                                               _lengths(dataset, "rejected_ids"))
    elif {"chosen_input_ids", "rejected_input_ids"} <= columns:      # ORPO, CPO: whole sequences per answer
        lengths = np.maximum(_lengths(dataset, "chosen_input_ids"), _lengths(dataset, "rejected_input_ids"))
    elif {"prompt_ids", "completion_ids"} <= columns:                # KTO: one answer per row
        lengths = _lengths(dataset, "prompt_ids") + _lengths(dataset, "completion_ids")
    elif "input_ids" in columns:                                     # SFT
        lengths = _lengths(dataset, "input_ids")
    else:
        raise ConfigError(f"stage.batching=length cannot read token lengths from this trainer's dataset (columns: "
                          f"{', '.join(sorted(columns))}); set stage.batching=random.")
    if max_length is not None:
        lengths = np.minimum(lengths, max_length)
    return [int(n) for n in lengths]


def length_sampler(dataset, lengths: list[int], batch_size: int, seed: int):
    """transformers' length-grouped sampler over the given lengths (mega-batches of up to 50 batches of batch_size), its
    order a function of (seed, epoch) alone, like accelerate's seedable random sampler: not of the global random
    state, which a reference pass that ran (or was found cached) would otherwise shift."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class SeededLengthGroupedSampler(LengthGroupedSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:  # called by the trainer (through accelerate) at every epoch
            self.epoch = epoch

        def __iter__(self):
            import torch

            self.generator = torch.Generator().manual_seed(seed + self.epoch)
            return super().__iter__()

    return SeededLengthGroupedSampler(batch_size, dataset=dataset, lengths=lengths)


def epoch_callback(trainer):
    """A callback that tells the length-aware sampler which epoch starts.

    transformers hands `set_epoch` to the sampler itself only in a single process: with several, accelerate wraps
    the batch sampler (BatchSamplerShard) and the call stops there. The trainer state's epoch at an epoch's start is
    the epoch (a float that may sit a rounding error below it), or, on a resume mid-epoch, the epoch plus a fraction:
    its floor is the epoch either way.
    """
    import math

    from transformers import TrainerCallback

    class _SamplerEpoch(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            sampler = getattr(trainer, "length_sampler", None)
            if sampler is not None:
                sampler.set_epoch(math.floor(state.epoch + 1e-6))

    return _SamplerEpoch()


def batch_tokens(inputs: dict[str, Any], packed_row: bool) -> tuple[int, int]:
    """(real tokens, computed tokens) of one collated training batch.

    Padded batches compute every position of `input_ids`; ORPO/CPO concatenate chosen and rejected, both padded to
    the longer of the two; a packed row (stage.padding_free, or SFT packing without an attention mask) computes only
    real tokens.
    """
    if "chosen_attention_mask" in inputs:
        chosen, rejected = inputs["chosen_attention_mask"], inputs["rejected_attention_mask"]
        real = int(chosen.sum() + rejected.sum())
        computed = 2 * chosen.shape[0] * max(chosen.shape[1], rejected.shape[1])
    elif "attention_mask" in inputs:
        real, computed = int(inputs["attention_mask"].sum()), inputs["attention_mask"].numel()
    else:
        real = computed = inputs["input_ids"].numel()
    return real, real if packed_row else computed


@dataclass
class TokenTally:
    """Real and computed tokens of the training batches this process ran."""

    real: int = 0
    computed: int = 0

    def add(self, inputs: dict[str, Any], packed_row: bool) -> None:
        real, computed = batch_tokens(inputs, packed_row)
        self.real += real
        self.computed += computed

    def summary(self, accelerator, strategy: str, packed_row: bool, train_seconds: float | None) -> dict:
        """Totals over all processes (a collective: every rank calls it), for summary.json."""
        import torch

        totals = torch.tensor([self.real, self.computed], dtype=torch.float64, device=accelerator.device)
        real, computed = (int(v) for v in accelerator.reduce(totals, reduction="sum").tolist())
        batching = {"strategy": strategy, "padding_free": packed_row, "real_tokens": real,
                    "computed_tokens": computed,
                    "padding_efficiency": round(real / computed, 4) if computed else None}
        throughput = None
        if train_seconds:
            throughput = {"train_seconds": round(train_seconds, 3),
                          "real_tokens_per_second": round(real / train_seconds, 1),
                          "computed_tokens_per_second": round(computed / train_seconds, 1)}
        return {"batching": batching, "throughput": throughput}
