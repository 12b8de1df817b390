"""Answers to a fixed prompt set, sampled the same way from every model that is compared.

The prompt set is fixed by the run's config (a prompts file, or the eval split's distinct prompts in order)
and each model samples from the same seed, so two runs of the same evaluation produce the same file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from alignment.errors import ConfigError
from alignment.config.schema import GenerationConfig
from alignment.records.console import progress

Messages = list[dict[str, str]]


def _as_messages(value: Any, where: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                 for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ConfigError(f"{where}: a prompt must be a string or a list of {{role, content}} messages, got "
                      f"{json.dumps(value)[:120]}")


def read_prompt_file(path: Path) -> list[Messages]:
    """A .txt file (one prompt per line) or a .jsonl file (`prompt` as text or messages, or `messages`)."""
    if not path.exists():
        raise ConfigError(f"eval.generation.prompts={path} does not exist. Give a .jsonl or .txt file of prompts, "
                          f"or null to use the eval split's prompts.")
    if path.suffix == ".txt":
        return [_as_messages(line.strip(), f"{path} line {n}") for n, line in
                enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    if path.suffix != ".jsonl":
        raise ConfigError(f"eval.generation.prompts={path}: use a .jsonl or .txt file.")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} line {n} is not JSON ({err.msg}).") from None
        if not isinstance(row, dict) or not ({"prompt", "messages"} & row.keys()):
            raise ConfigError(f"{path} line {n}: a row needs a `prompt` (text or messages) or `messages` field.")
        prompts.append(_as_messages(row.get("prompt", row.get("messages")), f"{path} line {n}"))
    return prompts


def prompt_set(settings: GenerationConfig, eval_rows: Sequence[dict] | None) -> list[Messages]:
    """The prompts every compared model answers: from the prompts file, else the eval split's distinct prompts."""
    if settings.prompts:
        prompts = read_prompt_file(Path(settings.prompts))
    else:
        prompts, seen = [], set()
        for row in eval_rows or []:
            key = json.dumps(row["prompt"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                prompts.append(list(row["prompt"]))
    prompts = prompts[:settings.num_prompts]
    # Each prompt answered samples_per_prompt times: consecutive copies, so a batch's sampling differs per copy.
    return [p for p in prompts for _ in range(settings.samples_per_prompt)]


def generate(model, tokenizer, prompts: Sequence[Messages], settings: GenerationConfig, seed: int) -> list[str]:
    """One answer per prompt, `settings.batch_size` prompts at a time, left-padded; sampling seeded once per model."""
    import torch

    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # a batch's prompts must end where generation begins
    answers: list[str] = []
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} \
        if settings.do_sample else {"do_sample": False}
    try:
        with torch.inference_mode():
            starts = range(0, len(prompts), settings.batch_size)
            for begin in progress(starts, total=len(starts), desc=f"generating {len(prompts)} answers"):
                texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                         for p in prompts[begin:begin + settings.batch_size]]
                batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                output = model.generate(**batch, max_new_tokens=settings.max_new_tokens,
                                        pad_token_id=tokenizer.pad_token_id, **sampling)
                new = output[:, batch["input_ids"].shape[1]:]
                answers.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def write_generations(path: Path, prompts: Sequence[Messages], columns: dict[str, list[str]],
                      samples_per_prompt: int = 1) -> None:
    """generations.jsonl: one row per prompt and sample with each model's answer, written whole before judging."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    with staging.open("w") as f:
        for index, prompt in enumerate(prompts):
            row = {"index": index, "prompt_index": index // samples_per_prompt, "sample": index % samples_per_prompt,
                   "prompt": prompt, **{name: answers[index] for name, answers in columns.items()}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    staging.replace(path)


def read_generations(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
