"""Token lengths under the chat template, and the prompt budget that TRL 1.x no longer applies.

Lengths are measured exactly as TRL's trainers will tokenize: `apply_chat_template` on the prompt with the
generation prompt, and on prompt + response; the response starts where the two diverge.

Truncation policy (stage.max_length, stage.max_prompt_length):
- preference rows: a prompt over the budget loses its oldest user/assistant pairs first, so the final user
  turn (and the system message) survive, as the handbook's left truncation intends. If even the system
  message plus the final user turn do not fit, the row is dropped as `prompt_over_budget`. Responses are
  left whole; TRL then cuts prompt + response at max_length from the end, and we count those rows.
- chat rows (SFT): TRL cuts at max_length from the end; a row whose first assistant turn starts beyond
  max_length would train on no response token at all and is dropped as `response_beyond_max_length`.
"""

from __future__ import annotations


def template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                         add_generation_prompt=add_generation_prompt)["input_ids"]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def fit_prompt(tokenizer, prompt: list[dict], budget: int) -> tuple[list[dict], list[int], int] | None:
    """(prompt, its ids, turns dropped) within the budget, or None when the final user turn cannot fit."""
    ids = template_ids(tokenizer, prompt, add_generation_prompt=True)
    dropped = 0
    start = 1 if prompt and prompt[0]["role"] == "system" else 0
    while len(ids) > budget:
        if len(prompt) - start <= 1:
            return None
        prompt = prompt[:start] + prompt[start + 2:]  # the oldest user turn and the assistant's answer to it
        dropped += 2
        ids = template_ids(tokenizer, prompt, add_generation_prompt=True)
    return prompt, ids, dropped


def measure_preference(tokenizer, row: dict, max_length: int, budget: int) -> dict:
    """Truncated row and its lengths; `drop` names the reason when the row cannot be trained on."""
    fitted = fit_prompt(tokenizer, row["prompt"], budget)
    if fitted is None:
        return {"drop": "prompt_over_budget"}
    prompt, prompt_ids, dropped = fitted
    lengths = {}
    for side in ("chosen", "rejected"):
        full = template_ids(tokenizer, prompt + row[side])
        lengths[side] = len(full) - common_prefix(prompt_ids, full)
    return {
        "row": {"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]},
        "prompt_tokens": len(prompt_ids),
        "chosen_tokens": lengths["chosen"],
        "rejected_tokens": lengths["rejected"],
        "turns_dropped": dropped,
        "cut": len(prompt_ids) + max(lengths.values()) > max_length,
    }


def measure_chat(tokenizer, row: dict, max_length: int) -> dict:
    messages = row["messages"]
    first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if len(template_ids(tokenizer, messages[:first_answer], add_generation_prompt=True)) >= max_length:
        return {"drop": "response_beyond_max_length"}
    full = template_ids(tokenizer, messages)
    prompt = template_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    return {
        "row": {"messages": messages},
        "prompt_tokens": len(prompt),
        "response_tokens": len(full) - common_prefix(prompt, full),
        "turns_dropped": 0,
        "cut": len(full) > max_length,
    }
