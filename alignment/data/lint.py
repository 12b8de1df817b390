"""Chat-template linter: the templating bugs that silently spoil SFT and DPO, caught on a sample before training.

Each row is tokenized the way TRL's trainers tokenize it (prompt with the generation prompt; prompt +
response), and the token ids are checked, not the text, because the bugs live in the ids:
- duplicate_bos: two BOS in a row (the template writes BOS and the tokenizer adds another);
- duplicate_eos: the response ends in EOS twice (the data already ends with the EOS text, or the template
  and a collator both append it);
- missing_eos: the response does not end in EOS, so the model never learns to stop;
- prompt_not_prefix: the prompt's ids are not a prefix of prompt + response (the template renders the
  generation prompt differently from a finished turn); TRL then trains on a context the model never sees
  at inference;
- pad_equals_eos: padding shares EOS's id; every collator that masks labels by pad id hides the EOS labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from alignment.data.lengths import common_prefix, template_ids

ADVICE = {
    "duplicate_bos": ("error", "The template already writes BOS; tokenize without adding special tokens again, "
                               "or remove bos_token from the template."),
    "duplicate_eos": ("error", "Strip the EOS text from the data (the template appends it), or remove the extra "
                               "EOS from the template."),
    "missing_eos": ("error", "Use a chat template that closes every assistant turn with the EOS token (e.g. "
                             "model.tokenizer.chat_template=chatml for ChatML models)."),
    "prompt_not_prefix": ("error", "Use a template that renders the generation prompt exactly as the start of "
                                   "a finished assistant turn (no extra tokens such as empty think blocks)."),
    "pad_equals_eos": ("warning", "Set model.tokenizer.pad_token to an unused special token distinct from EOS. "
                                  "TRL 1.x collators build labels from lengths and are unaffected, but any "
                                  "collator that masks by pad id hides every EOS label."),
}


@dataclass
class Finding:
    check: str
    severity: str
    rows: int             # rows of the sample with this problem
    example: dict         # source, row, field and the ids/text where it shows
    advice: str


def _split(row: dict, fmt: str) -> list[tuple[str, list[dict], list[dict]]]:
    if fmt == "chat":
        return [("messages", row["messages"][:-1], row["messages"][-1:])]
    return [("chosen", row["prompt"], row["chosen"]), ("rejected", row["prompt"], row["rejected"])]


def _strip_whitespace_tail(tokenizer, ids: list[int]) -> list[int]:
    end = len(ids)
    while end and not tokenizer.decode(ids[end - 1:end]).strip():
        end -= 1
    return ids[:end]


def _row_findings(tokenizer, prompt, response) -> dict[str, dict]:
    prompt_ids = template_ids(tokenizer, prompt, add_generation_prompt=True)
    full = template_ids(tokenizer, prompt + response)
    found: dict[str, dict] = {}
    shared = common_prefix(prompt_ids, full)
    if shared < len(prompt_ids):
        found["prompt_not_prefix"] = {"prompt_alone": tokenizer.decode(prompt_ids[shared:]),
                                      "with_response": tokenizer.decode(full[shared:shared + 8])}
    bos = tokenizer.bos_token_id
    if bos is not None and any(a == b == bos for a, b in zip(full, full[1:])):
        found["duplicate_bos"] = {"start": tokenizer.decode(full[:6])}
    tail = _strip_whitespace_tail(tokenizer, full[shared:])
    eos = tokenizer.eos_token_id
    if not tail or tail[-1] != eos:
        found["missing_eos"] = {"response_end": tokenizer.decode(tail[-8:]), "eos_token": tokenizer.eos_token}
    elif len(tail) > 1 and _strip_whitespace_tail(tokenizer, tail[:-1])[-1:] == [eos]:
        found["duplicate_eos"] = {"response_end": tokenizer.decode(tail[-8:])}
    return found


def lint(tokenizer, rows: list[dict], fmt: str) -> list[Finding]:
    """Findings over the sample; `rows` carry `__source` and `__row` so examples point into the user's files."""
    counts: dict[str, int] = {}
    examples: dict[str, dict] = {}
    for row in rows:
        seen = set()
        for field, prompt, response in _split(row, fmt):
            for check, detail in _row_findings(tokenizer, prompt, response).items():
                if check not in seen:
                    seen.add(check)
                    counts[check] = counts.get(check, 0) + 1
                examples.setdefault(check, {"source": row.get("__source"), "row": row.get("__row"),
                                            "field": field, **detail})
    if rows and tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        counts["pad_equals_eos"] = len(rows)
        examples["pad_equals_eos"] = {"source": rows[0].get("__source"), "row": rows[0].get("__row"),
                                      "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token,
                                      "id": tokenizer.eos_token_id}
    return [Finding(check, ADVICE[check][0], counts[check], examples[check], ADVICE[check][1])
            for check in ADVICE if check in counts]


def as_records(findings: list[Finding]) -> list[dict]:
    return [asdict(f) for f in findings]


def describe(finding: dict) -> str:
    example = ", ".join(f"{k}={v!r}" for k, v in finding["example"].items())
    return (f"{finding['severity']} {finding['check']}: {finding['rows']} sampled row(s), e.g. {example}. "
            f"{finding['advice']}")
