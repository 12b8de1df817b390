"""Pairwise judges: given a prompt and two answers, which is better?

- rule: a function scores each answer on its own (offline, deterministic); the higher score wins.
- reward_model: a sequence-classification model scores prompt + answer; the higher score wins.
- http: an OpenAI-compatible chat-completions endpoint reads both answers and names the better one, in the
  MT-Bench pairwise format ([[A]], [[B]] or [[C]] for a tie). Position bias is handled by asking twice with
  the answers swapped (both_orders); verdicts that disagree count as a tie. Rate limits, server errors and
  timeouts are retried with backoff; pairs are judged by a bounded pool of threads; each verdict is appended to
  <eval dir>/verdicts.jsonl as it comes and reused by a later evaluation of the same pairs by the same judge.
A judge that cannot give a verdict raises JudgeError naming the prompt, the endpoint and what came back, and,
from judge_pairs, how many pairs were judged and where they are kept. The API key is never in any of it.
"""

from __future__ import annotations

import email.utils
import hashlib
import importlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from alignment.errors import ConfigError
from alignment.config.schema import JudgeConfig

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
JUDGES = ("none", "rule", "reward_model", "http")


class JudgeError(RuntimeError):
    """The judge gave no usable verdict (timeout, refused connection, malformed answer, retries exhausted)."""

    verdicts: dict = {}            # {index: Verdict} of the pairs judged before it stopped (judge_pairs sets it)


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


class JudgeCancelled(Exception):
    """A request given up because another pair's failure already stopped the judging (never shown to users)."""


def _retryable(status: int) -> bool:
    """Rate limits, request timeouts and server errors pass; a bad request, key, permission or URL does not."""
    return status in (408, 429) or status >= 500


def _retry_after(headers) -> Optional[float]:
    """Seconds a 429/503 asks to wait: Retry-After-Ms, Retry-After in seconds or as an HTTP date; None if absent."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            if name == "retry-after-ms":
                continue
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError, OverflowError):
                continue
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    return None


class HttpJudge:
    """An OpenAI-compatible /chat/completions endpoint as pairwise judge, through the `openai` SDK.

    Retries are ours, not the SDK's (the client is made with max_retries=0). The SDK (3.x) does retry 408, 409,
    429 and 5xx and honours Retry-After, but its backoff is fixed by module constants (0.5 s doubling to 8 s,
    Retry-After up to 120 s), so neither eval.judge.backoff_s / backoff_max_s nor a fast test could set it, it
    also retries 409, and it cannot be told to stop waiting when another pair has already failed. Our loop:
    at most max_retries retries per request, on 408/429/5xx, timeouts and refused or dropped connections;
    waits backoff_s * 2^n with jitter (x0.5..1), at least a server's Retry-After, never more than backoff_max_s.
    Any other status (400, 401, 403, 404, 422...) fails at once: asking again gets the same answer.
    """

    position_free = False

    def __init__(self, settings: JudgeConfig):
        import openai

        self.settings = settings
        self.endpoint = settings.url.rstrip("/") + "/chat/completions"
        self.concurrency = settings.concurrency
        self._key_env = settings.api_key_env
        key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        # Never stored on self in the clear beyond the client, never in any message: _scrub removes it from
        # whatever the server sends back (an echo of the Authorization header, a 401 body quoting the key).
        self._secret = key or None
        self.client = openai.OpenAI(base_url=settings.url, api_key=key or "no-key", timeout=settings.timeout_s,
                                    max_retries=0)
        self._stop = threading.Event()
        for name in ("openai", "httpx", "httpx2"):  # one INFO line per request would bury run.log
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)

    @property
    def identity(self) -> dict:
        """What decides a verdict besides the pair (the key of reused verdicts): the model and how it is asked.
        Not the URL (the same model behind another host or port judges alike), the key, retries or concurrency."""
        return {"name": "http", "model": self.settings.model, "max_tokens": self.settings.max_tokens,
                "both_orders": self.settings.both_orders, "temperature": 0,
                "system": hashlib.sha256(JUDGE_SYSTEM.encode()).hexdigest()[:16]}

    def scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def stop(self) -> None:
        """Give up: requests waiting to retry stop waiting (JudgeCancelled); new ones are not sent."""
        self._stop.set()

    def resume(self) -> None:
        self._stop.clear()

    def request_body(self, prompt: Messages, a: str, b: str) -> dict:
        user = (f"[User Question]\n{_question_text(prompt)}\n\n[The Start of Assistant A's Answer]\n{a}\n"
                f"[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{b}\n"
                f"[The End of Assistant B's Answer]")
        return {"model": self.settings.model, "temperature": 0, "max_tokens": self.settings.max_tokens,
                "messages": [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]}

    def backoff(self, retry: int, retry_after: Optional[float]) -> float:
        """The wait before retry number `retry` (1-based)."""
        settings = self.settings
        wait = min(settings.backoff_max_s, settings.backoff_s * 2 ** (retry - 1)) * (0.5 + 0.5 * random.random())
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, settings.backoff_max_s)

    def _fatal(self, where: str, err) -> JudgeError:
        status = err.status_code
        if status == 401:
            if self._key_env:
                held = f"the key in ${self._key_env}" if self._secret else f"no key (${self._key_env} is not set)"
                fix = f"Set {self._key_env} to a valid key (eval.judge.api_key_env names the variable)."
            else:
                held, fix = "no key (eval.judge.api_key_env=null)", "Set eval.judge.api_key_env to the variable " \
                                                                    "that holds the key."
            return JudgeError(f"{where} answered HTTP 401 Unauthorized: it refused {held}. {fix} Not retried.")
        if status == 403:
            return JudgeError(f"{where} answered HTTP 403 Forbidden: the key in ${self._key_env} may not use model "
                              f"{self.settings.model!r}. Not retried.")
        body = self.scrub(err.response.text if err.response is not None else "")[:200]
        hint = {404: " Check eval.judge.url (the base URL, ending in /v1 for most servers) and eval.judge.model.",
                400: " Check eval.judge.model and eval.judge.max_tokens."}.get(status, "")
        return JudgeError(f"{where} answered HTTP {status}: {body!r}.{hint} Not retried.")

    def _post(self, body: dict, index: int) -> str:
        import openai

        where = f"the judge at {self.endpoint} (prompt {index})"
        attempts = self.settings.max_retries + 1
        for attempt in range(1, attempts + 1):
            if self._stop.is_set():
                raise JudgeCancelled()
            retry_after = None
            try:
                raw = self.client.chat.completions.with_raw_response.create(**body).http_response.text
                break
            except openai.APIStatusError as err:
                if not _retryable(err.status_code):
                    raise self._fatal(where, err) from None
                problem = f"answered HTTP {err.status_code}"
                retry_after = _retry_after(err.response.headers if err.response is not None else None)
            except openai.APITimeoutError:
                problem = f"did not answer within eval.judge.timeout_s={self.settings.timeout_s:g} s"
            except openai.APIConnectionError as err:
                problem = f"cannot be reached ({self.scrub(str(err.__cause__ or err))[:200]})"
            if attempt == attempts:
                advice = ("Raise eval.judge.timeout_s, or check the server." if "did not answer" in problem else
                          "Check eval.judge.url." if "cannot be reached" in problem else
                          "The server is overloaded or failing; raise eval.judge.max_retries / backoff_max_s, or "
                          "lower eval.judge.concurrency.")
                raise JudgeError(f"{where} {problem}, {attempts} attempt(s) in all (eval.judge.max_retries="
                                 f"{self.settings.max_retries}). {advice}") from None
            wait = self.backoff(attempt, retry_after)
            log.warning("%s %s; retry %d/%d in %.2f s", where, problem, attempt, attempts - 1, wait)
            if self._stop.wait(wait):
                raise JudgeCancelled()
        try:
            return json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{where} sent an answer that is not an OpenAI chat completion (no "
                             f"choices[0].message.content): {self.scrub(raw)[:200]!r}") from None

    def ask(self, prompt: Messages, a: str, b: str, index: int) -> tuple[str, str]:
        """One verdict 'a' | 'b' | 'tie' for answers in this order, with the judge's text."""
        text = self.scrub(self._post(self.request_body(prompt, a, b), index) or "")
        found = _VERDICT.findall(text)
        if not found:
            raise JudgeError(f"the judge at {self.endpoint} (prompt {index}) gave no verdict ([[A]], [[B]] or [[C]]) "
                             f"in its answer: {text[:200]!r}")
        return {"A": "a", "B": "b", "C": "tie"}[found[-1]], text

    def compare(self, prompt: Messages, a: str, b: str, index: int = 0) -> Verdict:
        first, first_text = self.ask(prompt, a, b, index)
        if not self.settings.both_orders:
            return Verdict(first, {"verdicts": [first_text]})
        swapped, second_text = self.ask(prompt, b, a, index)
        second = {"a": "b", "b": "a", "tie": "tie"}[swapped]  # back in the original order
        return Verdict(first if first == second else "tie", {"verdicts": [first_text, second_text],
                                                              "orders": [first, second]})


# ----------------------------------------------------------------------------- judging many pairs

VERDICTS_FILE = "verdicts.jsonl"


def pair_key(identity: dict, prompt: Messages, a: str, b: str) -> str:
    """Which verdict a pair may reuse: the same prompt, the same two answers in the same places, the same judge."""
    text = json.dumps({"judge": identity, "prompt": prompt, "a": a, "b": b}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class VerdictStore:
    """<eval dir>/verdicts.jsonl: one line per pair the judge answered, appended (and synced) as each arrives, in
    arrival order; read back by pair_key so that evaluating again asks only for what is missing."""

    def __init__(self, path: Path):
        self.path = path
        self.known: dict[str, Verdict] = {}
        self._lock = threading.Lock()
        if path.exists():
            text = path.read_text(encoding="utf-8")
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    row = json.loads(line)
                    self.known[row["key"]] = Verdict(row["winner"], row["detail"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.warning("%s line %d is not a verdict (an interrupted write?); that pair is judged again",
                                path, number)
            if text and not text.endswith("\n"):  # a torn last line: start the next one on a line of its own
                with path.open("a", encoding="utf-8") as f:
                    f.write("\n")

    def get(self, key: str) -> Optional[Verdict]:
        return self.known.get(key)

    def add(self, key: str, index: int, verdict: Verdict, judge_model: Optional[str]) -> None:
        row = {"key": key, "index": index, "judge_model": judge_model, "winner": verdict.winner,
               "detail": verdict.detail}
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            self.known[key] = verdict


@dataclass
class Judged:
    verdicts: list[Verdict]        # in prompt order
    asked: int                     # distinct pairs sent to the judge in this run
    reused: int                    # pairs answered from verdicts.jsonl without asking
    file: Optional[Path]           # verdicts.jsonl, for judges that keep one


def judge_pairs(judge, prompts: list[Messages], first: list[str], second: list[str],
                out_dir: Optional[Path] = None) -> Judged:
    """Every pair's verdict, in prompt order whatever the concurrency.

    A judge with an `identity` (http) is asked by a pool of `judge.concurrency` threads, each distinct pair once;
    its verdicts go to out_dir/verdicts.jsonl as they arrive and are reused from there. A local judge (rule,
    reward model) scores in order in this thread. When the judge finally fails, the JudgeError says how many
    pairs were judged and where they are, and carries them as `.verdicts` ({index: Verdict}).
    """
    total = len(prompts)
    done: dict[int, Verdict] = {}
    identity = getattr(judge, "identity", None)
    if identity is None or out_dir is None:
        for index, prompt in enumerate(prompts):
            try:
                done[index] = judge.compare(prompt, first[index], second[index], index=index)
            except JudgeError as err:
                raise _stopped(err, done, total, None) from None
        return Judged([done[i] for i in range(total)], asked=total, reused=0, file=None)

    store = VerdictStore(out_dir / VERDICTS_FILE)
    groups: dict[str, list[int]] = {}  # distinct pairs, by first index
    for index, prompt in enumerate(prompts):
        groups.setdefault(pair_key(identity, prompt, first[index], second[index]), []).append(index)
    todo = []
    for key, indices in groups.items():
        known = store.get(key)
        if known is None:
            todo.append((key, indices))
        else:
            done.update((i, known) for i in indices)
    reused = len(done)
    concurrency = max(1, int(getattr(judge, "concurrency", 1)))
    log.info("judging %d pairs: %d from %s, %d to ask (%d at a time)", total, reused, store.path, len(todo),
             concurrency)
    failure: Optional[BaseException] = None
    judge.resume()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge")

    def ask(index: int) -> Verdict:
        try:
            return judge.compare(prompts[index], first[index], second[index], index)
        except JudgeCancelled:
            raise
        except BaseException:
            judge.stop()  # before this worker takes the next pair: nothing new is sent after a failure
            raise

    futures = {pool.submit(ask, indices[0]): (key, indices) for key, indices in todo}
    try:
        for future in as_completed(futures):
            key, indices = futures[future]
            try:
                verdict = future.result()
            except (JudgeCancelled, CancelledError):
                continue
            except Exception as err:  # the first failure stops the rest; what is in flight may still land
                if failure is None:
                    failure = err
                    judge.stop()
                    for other in futures:
                        other.cancel()
                continue
            store.add(key, indices[0], verdict, identity.get("model"))
            done.update((i, verdict) for i in indices)
    except BaseException:  # Ctrl-C: stop waiting for retries, keep what was written
        judge.stop()
        for other in futures:
            other.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failure is not None:
        if isinstance(failure, JudgeError):
            raise _stopped(failure, done, total, store.path) from None
        raise failure
    return Judged([done[i] for i in range(total)], asked=len(todo), reused=reused, file=store.path)


def _stopped(err: JudgeError, done: dict[int, Verdict], total: int, kept: Optional[Path]) -> JudgeError:
    where = ""
    if kept is not None:
        where = (f", kept in {kept}; the same command again with resume=true (run_dir={kept.parent.parent}) "
                 f"asks the judge only for the other {total - len(done)}")
    stopped = JudgeError(f"{err} Judging stopped: {len(done)} of {total} pairs judged{where}.")
    stopped.verdicts = dict(done)
    return stopped


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
        check_http_settings(settings)
    if settings.name == "reward_model" and not settings.path:
        raise ConfigError("judge=reward_model needs eval.judge.path: a sequence-classification reward model dir "
                          "or hub id.")


def check_http_settings(settings: JudgeConfig) -> None:
    """The retry and concurrency settings of judge=http, one line naming the key (validation calls check_judge)."""
    for key, least in (("max_retries", 0), ("concurrency", 1)):
        value = getattr(settings, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"eval.judge.{key} must be an integer >= {least} (got {value!r}).")
    for key in ("backoff_s", "backoff_max_s"):
        value = getattr(settings, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"eval.judge.{key} must be a number of seconds >= 0 (got {value!r}).")
    if settings.backoff_max_s < settings.backoff_s:
        raise ConfigError(f"eval.judge.backoff_max_s={settings.backoff_max_s:g} is below eval.judge.backoff_s="
                          f"{settings.backoff_s:g}: the cap on one wait must be at least the first wait.")


def make_judge(settings: JudgeConfig):
    if settings.name == "rule":
        return ScoreJudge(load_rule(settings.rule))
    if settings.name == "reward_model":
        return ScoreJudge(reward_model_scorer(settings.path))
    if settings.name == "http":
        return HttpJudge(settings)
    return None
