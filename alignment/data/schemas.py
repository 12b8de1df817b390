"""The three row layouts of the product's datasets, the per-row checks, and conversion to TRL's formats.

- ultrachat (HuggingFaceH4/ultrachat_200k): `messages` → TRL's conversational language-modeling rows.
- ultrafeedback (HuggingFaceH4/ultrafeedback_binarized) and orpo (mlabonne/orpo-dpo-mix-40k): full
  `chosen`/`rejected` conversations → conversational prompt/chosen/rejected, where the prompt is the turns
  both share (system message included) and chosen/rejected are the differing final assistant turns.

A row check returns the first `Problem` it finds; its `kind` is a field of `BadRowPolicy`, so each kind's
fail-or-drop policy is one config key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Schema:
    name: str
    hub_id: str
    format: str                 # chat | preference
    columns: tuple[str, ...]    # every column of the real dataset
    required: tuple[str, ...]   # the columns we read


SCHEMAS = {
    "ultrachat": Schema("ultrachat", "HuggingFaceH4/ultrachat_200k", "chat",
                        ("prompt", "prompt_id", "messages"), ("messages",)),
    "ultrafeedback": Schema("ultrafeedback", "HuggingFaceH4/ultrafeedback_binarized", "preference",
                            ("prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen",
                             "score_rejected"), ("chosen", "rejected")),
    "orpo": Schema("orpo", "mlabonne/orpo-dpo-mix-40k", "preference",
                   ("source", "chosen", "rejected", "prompt", "question"), ("chosen", "rejected")),
}

# The order in which a row's problems are reported: structural first, so the message names the real cause.
PROBLEM_KINDS = ("malformed", "roles", "empty", "prompt_mismatch", "identical")


# What to do about rows dropped for each reason: the row problems above and the length drops of lengths.py. Advice is
# for the cause: pairs whose chosen equals rejected are a data problem, which no length setting changes.
DROP_ADVICE = {
    "malformed": "fix the rows' structure: each message a {role, content} object with string content and a role of "
                 + ", ".join(ROLES),
    "roles": "fix the turn order: user and assistant alternate after an optional system message, and the last turn "
             "is the assistant's",
    "empty": "fill in or remove the messages with empty content",
    "prompt_mismatch": "make each pair's chosen and rejected conversations share every turn but the last",
    "identical": "fix the pairs: their chosen and rejected responses are the same text, so they carry no preference "
                 "(no length setting changes that)",
    "prompt_over_budget": "raise stage.max_prompt_length (with stage.max_length), or use shorter prompts",
    "response_beyond_max_length": "raise stage.max_length, or use conversations whose first response starts earlier",
}


def drop_advice(counts: Mapping[str, int]) -> str:
    """What to do about dropped rows, the most frequent reason first, e.g. for "no training rows left"."""
    reasons = [kind for kind, n in sorted(counts.items(), key=lambda item: -item[1]) if n]
    advice = [f"{kind}: {DROP_ADVICE[kind]}" for kind in reasons if kind in DROP_ADVICE]
    return "; ".join(advice) if advice else "fix the data"


@dataclass(frozen=True)
class Problem:
    kind: str     # one of PROBLEM_KINDS
    field: str    # e.g. "chosen[2].content"
    detail: str


def missing_columns(schema: Schema, columns: list[str]) -> list[str]:
    return [c for c in schema.required if c not in columns]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_conversation(conversation: Any, column: str) -> Problem | None:
    """Structure, then role order, then empty content; the first problem found, or None."""
    if not isinstance(conversation, list):
        return Problem("malformed", column, f"is {_type_name(conversation)}, expected a list of messages")
    if not conversation:
        return Problem("malformed", column, "is an empty conversation")
    for i, message in enumerate(conversation):
        where = f"{column}[{i}]"
        if not isinstance(message, dict):
            return Problem("malformed", where, f"is {_type_name(message)}, expected {{role, content}}")
        for key in ("role", "content"):
            if key not in message or message[key] is None:
                return Problem("malformed", f"{where}.{key}", "is missing")
        if not isinstance(message["content"], str):
            return Problem("malformed", f"{where}.content", f"is {_type_name(message['content'])}, expected a string")
        if message["role"] not in ROLES:
            return Problem("malformed", f"{where}.role", f"is {message['role']!r}, expected one of {', '.join(ROLES)}")
    start = 1 if conversation[0]["role"] == "system" else 0
    for i, message in enumerate(conversation[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            return Problem("roles", f"{column}[{i}].role",
                           f"is {message['role']!r} where {expected!r} was expected (after an optional leading "
                           f"system message, turns alternate user/assistant)")
    if conversation[-1]["role"] != "assistant":
        return Problem("roles", f"{column}[{len(conversation) - 1}].role",
                       f"the last turn is {conversation[-1]['role']!r}; it must be the assistant's response")
    for i, message in enumerate(conversation):
        if not message["content"].strip():
            return Problem("empty", f"{column}[{i}].content", "is empty")
    return None


def _plain(conversation: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in conversation]


def check_preference(chosen: Any, rejected: Any) -> Problem | None:
    problems = [p for p in (check_conversation(chosen, "chosen"), check_conversation(rejected, "rejected")) if p]
    if problems:
        return min(problems, key=lambda p: PROBLEM_KINDS.index(p.kind))
    if len(chosen) != len(rejected):
        return Problem("prompt_mismatch", "rejected",
                       f"has {len(rejected)} turns and chosen has {len(chosen)}: they must share every turn "
                       f"but the final assistant one")
    for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])):
        if (a["role"], a["content"]) != (b["role"], b["content"]):
            return Problem("prompt_mismatch", f"rejected[{i}].content",
                           f"differs from chosen[{i}]: chosen and rejected must answer the same prompt")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        return Problem("identical", f"chosen[{len(chosen) - 1}].content",
                       "equals the rejected response: the pair carries no preference")
    return None


def check_row(schema: Schema, row: dict) -> Problem | None:
    if schema.format == "chat":
        return check_conversation(row["messages"], "messages")
    return check_preference(row["chosen"], row["rejected"])


def convert_row(schema: Schema, row: dict) -> dict:
    """A row that passed `check_row` → TRL's conversational format (only role and content are kept)."""
    if schema.format == "chat":
        return {"messages": _plain(row["messages"])}
    chosen, rejected = _plain(row["chosen"]), _plain(row["rejected"])
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
