"""Pairwise judges: given a prompt and two answers, which is better?

- rule: a function scores each answer on its own (offline, deterministic); the higher score wins.
- reward_model: a sequence-classification model scores prompt + answer; the higher score wins.
- http: an OpenAI-compatible chat-completions endpoint reads both answers and names the better one, in the
  MT-Bench pairwise format ([[A]], [[B]] or [[C]] for a tie). Position bias is handled by asking twice with
  the answers swapped (both_orders); verdicts that disagree count as a tie.
A judge that cannot give a verdict raises JudgeError naming the prompt, the endpoint and what came back.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

from ..config import ConfigError, JudgeConfig

Messages = list[dict[str, str]]
JUDGES = ("none", "rule", "reward_model", "http")


class JudgeError(RuntimeError):
    """The judge gave no usable verdict (timeout, refused connection, malformed answer)."""


@dataclass(frozen=True)
class Verdict:
    winner: str                    # "a" | "b" | "tie"
    detail: dict                   # what the judge said: scores, or the raw verdict text(s)


# ----------------------------------------------------------------------------- rules

_QUESTION = re.compile(r"(-?\d+)\s*([+-])\s*(-?\d+)\s*\?\s*$")
_STATEMENT = re.compile(r"(-?\d+)\s*([+-])\s*(-?\d+)\s*=\s*(-?\d+)")


def arithmetic(prompt: Messages, response: str) -> float:
    """1 when the answer states the asked sum or difference with its right result ('7 + 5 = 12.' for 'What is
    7 + 5?' in the last user turn), else 0: a wrong result and an answer to another question both score 0."""
    question = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    asked = _QUESTION.search(question.strip())
    if asked is None:
        raise JudgeError(f"the arithmetic rule cannot read a sum or difference from the prompt {question[:80]!r}; "
                         f"it judges the synthetic arithmetic task only. Use eval.judge.rule=package.module:function "
                         f"for your data, or judge=http / judge=reward_model.")
    a, op, b = int(asked.group(1)), asked.group(2), int(asked.group(3))
    stated = _STATEMENT.search(response)
    if stated is None:
        return 0.0
    expected = (a, op, b, a + b if op == "+" else a - b)
    return float((int(stated.group(1)), stated.group(2), int(stated.group(3)), int(stated.group(4))) == expected)


RULES: dict[str, Callable[[Messages, str], float]] = {"arithmetic": arithmetic}


def load_rule(spec: str) -> Callable[[Messages, str], float]:
    """A built-in rule by name, or `package.module:function`; a bad spec is a ConfigError (checked before any run)."""
    if spec in RULES:
        return RULES[spec]
    module_name, _, function_name = spec.partition(":")
    if not function_name:
        raise ConfigError(f"eval.judge.rule={spec} is neither a built-in rule ({', '.join(RULES)}) nor "
                          f"`package.module:function`.")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"eval.judge.rule={spec} cannot be loaded ({type(err).__name__}: {err}). The module must "
                          f"be importable from this environment and define {function_name}(prompt, response).") from None
    if not callable(function):
        raise ConfigError(f"eval.judge.rule={spec} is not a function.")
    return function


class ScoreJudge:
    """Scores each answer alone; the higher score wins, equal scores tie. Symmetric: order does not matter."""

    position_free = True

    def __init__(self, score: Callable[[Messages, str], float]):
        self.score = score

    def compare(self, prompt: Messages, a: str, b: str, index: int = 0) -> Verdict:
        score_a, score_b = float(self.score(prompt, a)), float(self.score(prompt, b))
        winner = "a" if score_a > score_b else "b" if score_b > score_a else "tie"
        return Verdict(winner, {"score_a": score_a, "score_b": score_b})


def reward_model_scorer(path: str, tokenizer_source: Optional[str] = None) -> Callable[[Messages, str], float]:
    """A sequence-classification reward model's scalar for prompt + answer, chat template applied."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()

    def score(prompt: Messages, response: str) -> float:
        text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        with torch.inference_mode():
            logits = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits
        return float(logits[0, 0])

    return score


# ----------------------------------------------------------------------------- http

JUDGE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. Choose the assistant that follows the user's instructions and answers the "
    "user's question better, considering helpfulness, relevance, accuracy, depth and level of detail. Avoid any "
    "position bias: the order in which the responses were presented must not influence your decision, nor their "
    "length or the assistants' names. Explain briefly, then output your final verdict strictly in this format: "
    "\"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.")
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def _question_text(prompt: Messages) -> str:
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class HttpJudge:
    """An OpenAI-compatible /chat/completions endpoint as pairwise judge."""

    position_free = False

    def __init__(self, settings: JudgeConfig):
        self.settings = settings
        self.endpoint = settings.url.rstrip("/") + "/chat/completions"

    def request_body(self, prompt: Messages, a: str, b: str) -> dict:
        user = (f"[User Question]\n{_question_text(prompt)}\n\n[The Start of Assistant A's Answer]\n{a}\n"
                f"[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{b}\n"
                f"[The End of Assistant B's Answer]")
        return {"model": self.settings.model, "temperature": 0, "max_tokens": self.settings.max_tokens,
                "messages": [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]}

    def _post(self, body: dict, index: int) -> str:
        headers = {"Content-Type": "application/json"}
        key_env = self.settings.api_key_env
        if key_env and os.environ.get(key_env):
            headers["Authorization"] = f"Bearer {os.environ[key_env]}"
        request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers,
                                         method="POST")
        where = f"the judge at {self.endpoint} (prompt {index})"
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as response:
                raw = response.read().decode("utf-8", errors="replace")
        except (socket.timeout, TimeoutError):
            raise JudgeError(f"{where} did not answer within eval.judge.timeout_s={self.settings.timeout_s:g} s. "
                             f"Raise the timeout or check the server.") from None
        except urllib.error.HTTPError as err:
            text = err.read().decode("utf-8", errors="replace")[:200]
            raise JudgeError(f"{where} answered HTTP {err.code}: {text}") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, (socket.timeout, TimeoutError)):
                raise JudgeError(f"{where} did not answer within eval.judge.timeout_s={self.settings.timeout_s:g} s. "
                                 f"Raise the timeout or check the server.") from None
            raise JudgeError(f"{where} cannot be reached: {err.reason}. Check eval.judge.url.") from None
        try:
            return json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{where} sent an answer that is not an OpenAI chat completion (no "
                             f"choices[0].message.content): {raw[:200]!r}") from None

    def ask(self, prompt: Messages, a: str, b: str, index: int) -> tuple[str, str]:
        """One verdict 'a' | 'b' | 'tie' for answers in this order, with the judge's text."""
        text = self._post(self.request_body(prompt, a, b), index)
        found = _VERDICT.findall(text or "")
        if not found:
            raise JudgeError(f"the judge at {self.endpoint} (prompt {index}) gave no verdict ([[A]], [[B]] or [[C]]) "
                             f"in its answer: {str(text)[:200]!r}")
        return {"A": "a", "B": "b", "C": "tie"}[found[-1]], text

    def compare(self, prompt: Messages, a: str, b: str, index: int = 0) -> Verdict:
        first, first_text = self.ask(prompt, a, b, index)
        if not self.settings.both_orders:
            return Verdict(first, {"verdicts": [first_text]})
        swapped, second_text = self.ask(prompt, b, a, index)
        second = {"a": "b", "b": "a", "tie": "tie"}[swapped]  # back in the original order
        return Verdict(first if first == second else "tie", {"verdicts": [first_text, second_text],
                                                              "orders": [first, second]})


def check_judge(settings: JudgeConfig) -> None:
    """Cheap checks before anything loads: the judge exists and has what it needs."""
    if settings.name not in JUDGES:
        raise ConfigError(f"eval.judge.name={settings.name} is not supported. Valid values: {', '.join(JUDGES)} "
                          f"(choose with judge=<name>).")
    if settings.name == "rule":
        load_rule(settings.rule)
    if settings.name == "http":
        if not settings.url or not re.match(r"https?://", settings.url):
            raise ConfigError("judge=http needs eval.judge.url, the base URL of an OpenAI-compatible API "
                              "(e.g. http://localhost:8000/v1)" + (f", not {settings.url!r}." if settings.url else "."))
        if not settings.model:
            raise ConfigError("judge=http needs eval.judge.model, the judge model's name at the endpoint.")
        if settings.timeout_s <= 0:
            raise ConfigError(f"eval.judge.timeout_s must be > 0 (got {settings.timeout_s}).")
    if settings.name == "reward_model" and not settings.path:
        raise ConfigError("judge=reward_model needs eval.judge.path: a sequence-classification reward model dir "
                          "or hub id.")


def make_judge(settings: JudgeConfig):
    if settings.name == "rule":
        return ScoreJudge(load_rule(settings.rule))
    if settings.name == "reward_model":
        return ScoreJudge(reward_model_scorer(settings.path))
    if settings.name == "http":
        return HttpJudge(settings)
    return None
