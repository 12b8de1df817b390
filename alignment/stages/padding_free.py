"""Padding-free DPO (stage.padding_free=true): each batch's sequences computed as one packed row of real tokens.

TRL 1.16 switched DPO's own `padding_free` off ("temporarily unavailable after a refactor"). This keeps TRL's
trainer, collator and loss as they are and changes only how the model computes a batch. TRL calls the policy and
the reference as `model(input_ids, attention_mask, labels=..., fused_lm_head=True)` on a right-padded
[2·batch, length] batch (its collator always pads on the right) and reads per-token log-probs of shape
[2·batch, length - 1] (`add_fused_lm_head`, trl/trainer/utils.py). The wrapper installed here on top of that
forward:

1. packs the real tokens of every row into one row [1, tokens], with position ids restarting at 0 for each
   sequence and the first label of each sequence masked (no token is scored against the previous sequence);
2. keeps attention inside each sequence: flash-attention 2 reads the sequence boundaries from the restarting
   position ids (its varlen kernels); otherwise the model's attention becomes `sdpa_varlen`, registered here through
   transformers' public AttentionInterface: torch's scaled-dot-product attention run causally on each sequence of
   the packed row (boundaries passed as `cu_seq_lens_q`, the keyword flash-attention's varlen path reads too), so no
   cross-sequence score is computed and nothing is quadratic in the packed length. (With sdpa, restarting position
   ids alone do not keep the sequences apart in transformers 5.24; a block-diagonal mask would, at a cost quadratic
   in the packed length: measured 9× slower than the padded batch on CPU.) A call without boundaries (evaluation's
   generation, a padded batch) runs plain sdpa;
3. scatters the packed per-token outputs back to the padded [rows, length - 1] layout, zeros at padding, exactly as
   the padded forward returns them, so the loss, the metrics and the reference cache are unchanged.

What it saves: every linear layer, norm, attention and the LM head run on real tokens only. Per-sequence log-probs
equal the padded path's (tests/test_batching.py: within 1e-5 on the tiny twin). Drop this module when TRL restores
`padding_free` for DPO: the contract it relies on (the fused forward's keywords and output fields) is pinned by
`trl>=1.16,<2` and by that test.
"""

from __future__ import annotations

import dataclasses
import types

import torch


VARLEN_ATTENTION = "sdpa_varlen"
# Per-token fields of TRL's FusedCausalLMOutput, shaped [rows, length - 1].
PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


@dataclasses.dataclass(frozen=True)
class Packing:
    """Where each row's real tokens sit in the packed row."""

    lengths: torch.Tensor   # [rows] real tokens per row
    starts: torch.Tensor    # [rows] offset of each row in the packed row
    real: torch.Tensor      # [rows, length] True at real tokens (right padding)

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> "Packing":
        real = attention_mask.bool()
        lengths = real.sum(dim=1)
        positions = torch.arange(real.shape[1], device=real.device)
        if not torch.equal(real, positions[None, :] < lengths[:, None]):
            raise ValueError("padding-free packing expects right-padded rows (TRL's DPO collator pads on the right)")
        starts = torch.cumsum(lengths, dim=0) - lengths
        return cls(lengths, starts, real)

    def position_ids(self) -> torch.Tensor:
        total = int(self.lengths.sum())
        index = torch.arange(total, device=self.lengths.device)
        return (index - torch.repeat_interleave(self.starts, self.lengths))[None]

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        return padded[self.real][None]

    def unpack_shifted(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed per-token outputs [1, tokens - 1] (position t scores token t + 1) back to [rows, length - 1]."""
        width = self.real.shape[1] - 1
        offsets = torch.arange(width, device=packed.device)
        valid = offsets[None, :] < (self.lengths[:, None] - 1)
        index = (self.starts[:, None] + offsets[None, :]).clamp(max=packed.shape[1] - 1)
        values = packed[0][index]
        return values.masked_fill(~valid, False if values.dtype == torch.bool else 0)


def sdpa_varlen(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """Attention for a packed row: sdpa, causal, on each sequence between the `cu_seq_lens_q` boundaries.

    query/key/value: [1, heads, tokens, head_dim]; returns [1, tokens, heads, head_dim] as transformers' attention
    functions do. Without boundaries: plain sdpa with the mask transformers built.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    bounds = cu_seq_lens_q.tolist()
    outputs = [sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                      None, is_causal=True, **kwargs)[0]
               for start, end in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outputs, dim=1), None


def _register_varlen_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, sdpa_varlen)
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)  # padded calls get sdpa's own masks


def add_padding_free_forward(model) -> None:
    """Wrap the fused-LM-head forward TRL installed on `model` (the causal LM under any PEFT wrapper)."""
    fused_forward = model.forward
    flash = model.config._attn_implementation == "flash_attention_2"
    if not flash:
        _register_varlen_attention()
        model.set_attn_implementation(VARLEN_ATTENTION)

    def packed_forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        attention_mask = kwargs.get("attention_mask")
        if not fused_lm_head or args or attention_mask is None or attention_mask.dim() != 2:
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        packing = Packing.of(attention_mask)
        packed_labels = packing.pack(labels).clone()
        packed_labels[0, packing.starts] = -100  # a sequence's first token is never scored against the one before
        input_ids = packing.pack(kwargs["input_ids"])
        boundaries = torch.cat([packing.starts, packing.lengths.sum()[None]]).to(torch.int32)
        longest = int(packing.lengths.max())
        kwargs.update(input_ids=input_ids, position_ids=packing.position_ids(), cu_seq_lens_q=boundaries,
                      cu_seq_lens_k=boundaries, max_length_q=longest, max_length_k=longest,
                      # flash-attention: no mask, boundaries from the arguments above. sdpa_varlen: an all-ones 2-D
                      # mask, for which transformers builds no mask at all (plain causal) and does not try to infer
                      # packing from the position ids (which would build a tokens × tokens mask).
                      attention_mask=None if flash else torch.ones_like(input_ids))
        output = fused_forward(fused_lm_head=True, labels=packed_labels, **kwargs)
        unpacked = {name: packing.unpack_shifted(getattr(output, name)) for name in PER_TOKEN_FIELDS
                    if getattr(output, name, None) is not None}
        return type(output)(**{**output, **unpacked})

    model.forward = types.MethodType(packed_forward, model)
