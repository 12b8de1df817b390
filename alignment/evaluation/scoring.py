"""Summed response log-probs under a causal LM, batched: what preference accuracy is computed from.

A pair's implicit reward (DPO's) is β·(log π(y|x) − log π_ref(y|x)); the held-out preference accuracy is the
share of pairs whose chosen response gets the larger reward. Both need log π(y|x) for every chosen and
rejected response under two models, so this module computes exactly that, with the prompt and response
tokenized as the trainer does (the chat template applied to the prompt with a generation prompt, then to
the whole conversation) and truncated from the end to max_length (TRL's keep_start).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from alignment.records.console import progress


@dataclass(frozen=True)
class Tokenized:
    """One tokenized prompt + response; the response starts at `response_start`."""

    ids: list[int]
    response_start: int


def tokenize(tokenizer, prompt: list[dict], response: list[dict], max_length: int) -> Tokenized:
    """Chat-template token ids of prompt + response, and where the response begins.

    The prompt's ids must be a prefix of the whole conversation's ids (true of every template we ship and
    of the real models' templates); when a template breaks that, the response boundary is taken from the
    length of the prompt's ids, which is what TRL does as well.
    """
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(prompt + response, tokenize=True, return_dict=False)
    start = min(len(prompt_ids), max_length)
    return Tokenized(ids=list(full_ids)[:max_length], response_start=start)


def response_logps(model, tokenizer, sequences: Sequence[Tokenized], batch_size: int) -> list[float]:
    """Sum of log p(response token | everything before it) for each sequence, `batch_size` at a time."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out: list[float] = [0.0] * len(sequences)
    # Longest first: batches of similar lengths waste less padding; results go back to their positions.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].ids))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            starts = range(0, len(order), batch_size)
            for begin in progress(starts, total=len(starts), desc=f"scoring {len(sequences)} sequences"):
                chunk = [sequences[i] for i in order[begin:begin + batch_size]]
                width = max(len(s.ids) for s in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, seq in enumerate(chunk):
                    ids[row, :len(seq.ids)] = torch.tensor(seq.ids)
                    mask[row, :len(seq.ids)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for row, seq in enumerate(chunk):
                    # Token t is predicted by the logits at t-1; one row at a time keeps the fp32 copy small.
                    targets = ids[row, seq.response_start:len(seq.ids)].to(device)
                    if len(targets) == 0:
                        continue
                    row_logits = logits[row, seq.response_start - 1:len(seq.ids) - 1].float()
                    logps = torch.log_softmax(row_logits, dim=-1).gather(-1, targets[:, None]).sum()
                    out[order[begin + row]] = float(logps)
    finally:
        model.train(was_training)
    return out


@dataclass(frozen=True)
class PairLogps:
    chosen: list[float]
    rejected: list[float]


def pair_logps(model, tokenizer, pairs: Sequence[dict], max_length: int, batch_size: int) -> PairLogps:
    """log π(chosen|prompt) and log π(rejected|prompt) for TRL-format preference rows (prompt/chosen/rejected)."""
    sequences = []
    for row in pairs:
        sequences.append(tokenize(tokenizer, list(row["prompt"]), list(row["chosen"]), max_length))
        sequences.append(tokenize(tokenizer, list(row["prompt"]), list(row["rejected"]), max_length))
    logps = response_logps(model, tokenizer, sequences, batch_size)
    return PairLogps(chosen=logps[0::2], rejected=logps[1::2])


def preference_accuracy(policy: PairLogps, reference: PairLogps, beta: float) -> dict[str, float]:
    """Implicit-reward accuracy of a policy against its reference; a tie (equal rewards) counts half.

    A policy equal to its reference gives every pair reward 0 on both sides: 0.5, chance. Also reported:
    the mean margin, and the reference-free log-prob accuracy (is log π(chosen) > log π(rejected)?).
    """
    n = len(policy.chosen)
    if n == 0:
        raise ValueError("no preference pairs to score")
    margins = [beta * ((pc - rc) - (pr - rr)) for pc, pr, rc, rr in
               zip(policy.chosen, policy.rejected, reference.chosen, reference.rejected)]
    # Exact zeros happen when policy and reference are the same weights; rounding noise is not a preference.
    ties = sum(1 for m in margins if abs(m) <= 1e-6 * beta)
    wins = sum(1 for m in margins if m > 1e-6 * beta)
    logp_wins = sum(1 for c, r in zip(policy.chosen, policy.rejected) if c > r)
    return {
        "pairs": n,
        "accuracy": (wins + 0.5 * ties) / n,
        "ties": ties,
        "margin_mean": sum(margins) / n,
        "logp_accuracy": logp_wins / n,
        "chosen_logp_mean": sum(policy.chosen) / n,
        "rejected_logp_mean": sum(policy.rejected) / n,
    }
