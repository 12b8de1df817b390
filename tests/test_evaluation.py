"""Evaluation: implicit-reward preference accuracy, generations, judges (rule, reward model, HTTP stub)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from alignment.evaluation.judges import HttpJudge, JudgeError, ScoreJudge, arithmetic, load_rule
from alignment.evaluation.scoring import PairLogps, preference_accuracy

from .conftest import run_cli

QUESTION = [{"role": "user", "content": "What is 7 + 5?"}]


# ----------------------------------------------------------------------------- the synthetic task, end to end

@pytest.mark.slow
def test_dpo_lifts_held_out_preference_accuracy_from_chance(demo_run):
    """Must-show: on the held-out questions, DPO moves the implicit-reward accuracy from 0.5 to >= 0.9."""
    report = json.loads((demo_run["dir"] / "2-dpo" / "eval" / "report.json").read_text())
    preference = report["preference"]
    assert report["status"] == "finished" and preference["pairs"] == 128
    # Before DPO the policy is its reference: every reward is 0, every pair a tie, accuracy exactly chance.
    assert preference["before"]["accuracy"] == 0.5 and preference["before"]["ties"] == 128
    assert preference["after"]["accuracy"] >= 0.9 and preference["after"]["ties"] == 0
    assert preference["after"]["margin_mean"] > 0
    assert report["reference"]["weights"] == str((demo_run["dir"] / "1-sft" / "model").resolve())
    assert "held-out preference accuracy (128 pairs, implicit reward vs the reference): 0.500 before →" \
        in demo_run["stdout"]


@pytest.mark.slow
def test_rule_judge_prefers_the_dpo_model_over_its_sft_parent(demo_run):
    """Must-show: the arithmetic rule's win rate of the DPO model's sampled answers over the SFT parent's."""
    out = demo_run["dir"] / "2-dpo" / "eval"
    report = json.loads((out / "report.json").read_text())
    judge = report["judge"]
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    verdicts = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    # 32 held-out questions, 4 sampled answers each from both models.
    assert len(generations) == len(verdicts) == judge["judged"] == 128
    assert {g["prompt_index"] for g in generations} == set(range(32)) and {g["sample"] for g in generations} == {0, 1, 2, 3}
    # The verdicts are the rule applied to the written answers, and the win rate counts a tie as half.
    for row, verdict in zip(generations, verdicts):
        policy, baseline = arithmetic(row["prompt"], row["policy"]), arithmetic(row["prompt"], row["baseline"])
        assert verdict["winner"] == ("policy" if policy > baseline else "baseline" if baseline > policy else "tie")
    assert judge["win_rate"] == (judge["wins"] + 0.5 * judge["ties"]) / 128
    # DPO removes part of the SFT data's misreading: clearly more wins than losses (30 vs 10 when measured).
    assert judge["win_rate"] > 0.5 and judge["wins"] >= 2 * judge["losses"]
    summary = json.loads((demo_run["dir"] / "2-dpo" / "summary.json").read_text())
    assert summary["evaluation"]["win_rate"] == judge["win_rate"]
    card = (demo_run["dir"] / "2-dpo" / "model" / "README.md").read_text()
    assert f"| preference accuracy after training | {report['preference']['after']['accuracy']:.4f} |" in card


@pytest.mark.slow
def test_eval_stage_reproduces_the_after_training_numbers(demo_run, tmp_path):
    """`stage=eval parent_run=<the DPO run>` finds the run's reference by itself and gets the same accuracy."""
    dpo = demo_run["dir"] / "2-dpo"
    result = run_cli("stage=eval", f"parent_run={dpo}", "stage.max_length=256", "stage.max_prompt_length=128",
                     "eval.generation.num_prompts=4", "eval.generation.max_new_tokens=8", f"run_dir={tmp_path / 'ev'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads((tmp_path / "ev" / "eval" / "report.json").read_text())["preference"]
    trained = json.loads((dpo / "eval" / "report.json").read_text())["preference"]
    assert ours["after"]["accuracy"] == trained["after"]["accuracy"]
    assert ours["before"]["accuracy"] == 0.5
    assert len((tmp_path / "ev" / "eval" / "generations.jsonl").read_text().splitlines()) == 4
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["stage"] == "eval" and summary["parent_run"] == str(dpo)
    assert "held-out preference accuracy" in result.stdout


# ----------------------------------------------------------------------------- scoring

def test_batched_scoring_equals_one_by_one_and_a_direct_forward(tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from alignment.preflight.compose import compose_run_config
    from alignment.evaluation.scoring import response_logps, tokenize
    from alignment.models.start import resolve_start

    model = AutoModelForCausalLM.from_pretrained(str(resolve_start(compose_run_config([])).weights))
    answers = ["7 + 5 = 12.", "7 + 5 = 13.", "12", "The answer is twelve, which is 7 plus 5."]
    sequences = [tokenize(tiny_tokenizer, QUESTION, [{"role": "assistant", "content": a}], 256) for a in answers]
    batched = response_logps(model, tiny_tokenizer, sequences, batch_size=4)
    single = response_logps(model, tiny_tokenizer, sequences, batch_size=1)
    assert batched == pytest.approx(single, abs=1e-4)
    # The response starts right after the generation prompt, and its log-probs are read off a plain forward.
    seq = sequences[0]
    prompt_ids = tiny_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
    assert seq.ids[:seq.response_start] == list(prompt_ids)
    with torch.no_grad():
        logits = model(torch.tensor([seq.ids])).logits[0]
    expected = sum(torch.log_softmax(logits[t - 1], -1)[seq.ids[t]].item() for t in range(seq.response_start,
                                                                                          len(seq.ids)))
    assert batched[0] == pytest.approx(expected, abs=1e-4)


def test_preference_accuracy_counts_ties_half_and_reports_reference_free_accuracy():
    reference = PairLogps(chosen=[-2.0, -2.0, -2.0, -2.0], rejected=[-3.0, -3.0, -3.0, -3.0])
    assert preference_accuracy(reference, reference, 0.1)["accuracy"] == 0.5
    policy = PairLogps(chosen=[-1.0, -2.5, -2.0, -1.5], rejected=[-4.0, -2.0, -3.0, -3.5])
    result = preference_accuracy(policy, reference, 0.5)
    # margins: 0.5*(1+1)=1, 0.5*(-0.5-1)=-0.75, 0, 0.5*(0.5+0.5)=0.5 → 2 wins, 1 tie, 1 loss
    assert result["accuracy"] == pytest.approx(2.5 / 4) and result["ties"] == 1
    assert result["margin_mean"] == pytest.approx((1 - 0.75 + 0 + 0.5) / 4)
    assert result["logp_accuracy"] == pytest.approx(3 / 4)


# ----------------------------------------------------------------------------- rule and reward-model judges

def test_arithmetic_rule_reads_the_question_and_the_result():
    assert arithmetic(QUESTION, "7 + 5 = 12.") == 1.0
    assert arithmetic(QUESTION, "7 + 5 = 13.") == 0.0
    assert arithmetic(QUESTION, "twelve") == 0.0
    follow_up = [*QUESTION, {"role": "assistant", "content": "7 + 5 = 12."},
                 {"role": "user", "content": "And what is 9 - 4?"}]
    assert arithmetic(follow_up, "9 - 4 = 5.") == 1.0
    with pytest.raises(JudgeError, match="cannot read a sum or difference"):
        arithmetic([{"role": "user", "content": "Write a poem."}], "Roses")
    verdict = ScoreJudge(arithmetic).compare(QUESTION, "7 + 5 = 13.", "7 + 5 = 12.")
    assert verdict.winner == "b" and verdict.detail == {"score_a": 0.0, "score_b": 1.0}


def shorter_wins(prompt, response):  # a user rule, loaded by eval.judge.rule=tests.test_evaluation:shorter_wins
    return -len(response)


def test_user_rules_load_from_module_and_function():
    assert load_rule("tests.test_evaluation:shorter_wins") is shorter_wins
    from alignment.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot be loaded"):
        load_rule("tests.test_evaluation:no_such_rule")
    with pytest.raises(ConfigError, match="neither a built-in rule"):
        load_rule("length")


def test_reward_model_judge_scores_with_a_sequence_classifier(tmp_path, tiny_tokenizer):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from alignment.evaluation.judges import reward_model_scorer

    config = AutoConfig.for_model("qwen2", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=64, vocab_size=1024, num_labels=1,
                                  pad_token_id=tiny_tokenizer.pad_token_id)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    score = reward_model_scorer(str(tmp_path / "rm"))
    a, b = score(QUESTION, "7 + 5 = 12."), score(QUESTION, "7 + 5 = 13.")
    assert a != b and score(QUESTION, "7 + 5 = 12.") == a  # deterministic, answer-dependent
    verdict = ScoreJudge(score).compare(QUESTION, "7 + 5 = 12.", "7 + 5 = 13.")
    assert verdict.winner == ("a" if a > b else "b")


# ----------------------------------------------------------------------------- HTTP judge against a local stub

class _Stub:
    """An OpenAI-compatible /v1/chat/completions on localhost whose behaviour each test chooses.

    mode: what a successful answer says: "ok" (a verdict: the answer with the right sum wins), "malformed" (no
    verdict), "garbage" (not JSON), "slow" (an "ok" answer after 2 s).
    script: statuses every distinct request gets before its success, e.g. (429, 502); a 429 carries Retry-After.
    fail_after: after this many requests in all, every request is answered fail_status (a server gone bad).
    delay: seconds each request takes (to see concurrency). It counts requests, per body too, and the most in flight.
    """

    def __init__(self, mode: str = "ok", script=(), retry_after: str | None = "0.2", fail_after: int | None = None,
                 fail_status: int = 502, delay: float = 0.0):
        self.mode, self.script, self.retry_after = mode, tuple(script), retry_after
        self.fail_after, self.fail_status, self.delay = fail_after, fail_status, delay
        self.requests, self.seen, self.in_flight, self.max_in_flight = [], {}, 0, 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers

            def do_POST(self):  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                with stub.lock:
                    stub.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                          "body": body, "at": time.monotonic()})
                    tries = stub.seen[raw] = stub.seen.get(raw, 0) + 1
                    count = len(stub.requests)
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    time.sleep(2 if stub.mode == "slow" else stub.delay)
                    if stub.fail_after is not None and count > stub.fail_after:
                        return self.answer(stub.fail_status, stub.error_body(stub.fail_status))
                    if tries <= len(stub.script):
                        status = stub.script[tries - 1]
                        extra = {"Retry-After": stub.retry_after} if status == 429 and stub.retry_after else {}
                        return self.answer(status, stub.error_body(status), extra)
                    user = body["messages"][-1]["content"]
                    # The stub prefers the answer with the right sum, like a good judge would.
                    first = user.split("[The Start of Assistant A's Answer]\n")[1].split("\n")[0]
                    verdict = "[[A]]" if "= 12." in first else "[[B]]"
                    text = ("I cannot decide." if stub.mode == "malformed" else
                            f"Assistant {verdict[2]} is correct. {verdict}")
                    payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": text}}]}
                    self.answer(200, b"not json" if stub.mode == "garbage" else json.dumps(payload).encode())
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

            def answer(self, status: int, data: bytes, extra: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def error_body(self, status: int) -> bytes:
        # A careless server echoes the key it refused, as some do: it must not reach any file or message.
        key = self.requests[-1]["headers"].get("authorization", "") if status == 401 else ""
        return json.dumps({"error": {"message": f"stub error {status} {key}".strip(), "type": "stub"}}).encode()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def start(mode: str = "ok", **behaviour) -> _Stub:
        servers.append(_Stub(mode, **behaviour))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _judge_settings(url: str, **extra):
    from alignment.config.schema import JudgeConfig

    fast = {"timeout_s": 5.0, "backoff_s": 0.01, "backoff_max_s": 0.5}  # tests wait milliseconds, not seconds
    return JudgeConfig(name="http", url=url, **{"model": "judge-stub", "api_key_env": "ALIGNMENT_TEST_JUDGE_KEY",
                                                **fast, **extra})


def test_http_judge_sends_well_formed_requests_and_parses_verdicts(stub, monkeypatch):
    server = stub("ok")
    monkeypatch.setenv("ALIGNMENT_TEST_JUDGE_KEY", "sk-test-judge-123")
    judge = HttpJudge(_judge_settings(server.url))
    verdict = judge.compare(QUESTION, "7 + 5 = 12.", "7 + 5 = 13.", index=3)
    assert verdict.winner == "a" and verdict.detail["orders"] == ["a", "a"]  # the same verdict in both orders
    assert len(server.requests) == 2
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == "Bearer sk-test-judge-123"
    body = request["body"]
    assert body["model"] == "judge-stub" and body["temperature"] == 0 and body["max_tokens"] == 1024
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "What is 7 + 5?" in body["messages"][1]["content"]
    # The second request swaps the positions.
    assert server.requests[1]["body"]["messages"][1]["content"].index("7 + 5 = 13.") < \
        server.requests[1]["body"]["messages"][1]["content"].index("7 + 5 = 12.")
    assert judge.compare(QUESTION, "7 + 5 = 13.", "7 + 5 = 12.").winner == "b"


@pytest.mark.parametrize("mode, message", [("malformed", "gave no verdict"), ("garbage", "not an OpenAI chat"),
                                           ("slow", "did not answer within")])
def test_http_judge_failures_are_clear(stub, mode, message):
    server = stub(mode)
    judge = HttpJudge(_judge_settings(server.url, timeout_s=0.5, max_retries=1))
    with pytest.raises(JudgeError, match=message) as err:
        judge.compare(QUESTION, "7 + 5 = 12.", "7 + 5 = 13.", index=5)
    assert "prompt 5" in str(err.value) and server.url in str(err.value)
    # A timeout is retried (then the error says how often it was tried); an answer without a verdict is not.
    assert len(server.requests) == (2 if mode == "slow" else 1)


def test_unreachable_judge_is_a_clear_error():
    judge = HttpJudge(_judge_settings("http://127.0.0.1:9/v1", timeout_s=2, max_retries=2))
    with pytest.raises(JudgeError, match="cannot be reached.*3 attempt"):
        judge.compare(QUESTION, "a", "b")


# Six arithmetic questions; the policy answers right on the even ones, so the right verdicts are known.
PAIRS = [([{"role": "user", "content": f"Question {i}: What is 7 + 5?"}],
          "7 + 5 = 12." if i % 2 == 0 else "7 + 5 = 13.", "7 + 5 = 13." if i % 2 == 0 else "7 + 5 = 12.")
         for i in range(6)]
RIGHT = ["policy" if i % 2 == 0 else "baseline" for i in range(6)]


def _judge_into(out: Path, settings):
    """The evaluation's judging step (evaluate._judge_all) on PAIRS, into an eval dir."""
    from alignment.evaluation.evaluate import _judge_all

    out.mkdir(parents=True, exist_ok=True)
    prompts, policy, baseline = (list(column) for column in zip(*PAIRS))
    return _judge_all(HttpJudge(settings), prompts, policy, baseline, out)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_local_judges_judge_in_order_and_keep_no_verdict_store(tmp_path):
    from alignment.evaluation.evaluate import _judge_all

    prompts, policy, baseline = (list(column) for column in zip(*PAIRS))
    result = _judge_all(ScoreJudge(arithmetic), prompts, policy, baseline, tmp_path)
    assert result["judged"] == 6 and result["win_rate"] == 0.5 and "verdicts_file" not in result
    rows = _rows(tmp_path / "judgments.jsonl")
    assert [row["winner"] for row in rows] == RIGHT and rows[0]["score_a"] == 1.0
    assert not (tmp_path / "verdicts.jsonl").exists()


def test_http_judge_retries_429_and_502_then_finishes(stub, tmp_path):
    """Every request is answered 429 (Retry-After: 0.2), then 502, then a verdict: the evaluation finishes."""
    server = stub("ok", script=(429, 502), retry_after="0.2")
    began = time.monotonic()
    result = _judge_into(tmp_path / "eval", _judge_settings(server.url, max_retries=2, concurrency=3))
    assert result["status"] == "finished" and result["judged"] == 6 and result["asked"] == 6 and result["reused"] == 0
    assert [row["winner"] for row in _rows(tmp_path / "eval" / "judgments.jsonl")] == RIGHT
    assert [row["index"] for row in _rows(tmp_path / "eval" / "judgments.jsonl")] == list(range(6))  # prompt order
    assert result["wins"] == result["losses"] == 3 and result["win_rate"] == 0.5
    # 6 pairs x 2 orders x (429, 502, 200): every distinct request tried exactly three times.
    assert len(server.requests) == 36 and sorted(server.seen.values()) == [3] * 12
    assert len(_rows(tmp_path / "eval" / "verdicts.jsonl")) == 6
    # The Retry-After of 0.2 s was honoured although backoff_s is 0.01: the second ask of a body came >= 0.2 s later.
    by_body: dict[str, list[float]] = {}
    for request in server.requests:
        by_body.setdefault(json.dumps(request["body"], sort_keys=True), []).append(request["at"])
    assert all(times[1] - times[0] >= 0.19 for times in by_body.values())
    assert time.monotonic() - began < 10


def test_persistent_502_keeps_the_verdicts_and_a_rerun_asks_only_for_the_rest(stub, tmp_path):
    """A judge that goes bad after 4 requests (2 pairs): max_retries + 1 attempts, then a JudgeError that says how
    many pairs were judged and where; the rerun against a healthy server asks only for the other 4 pairs."""
    out = tmp_path / "eval"
    failing = stub("ok", fail_after=4, fail_status=502)
    with pytest.raises(JudgeError) as err:
        _judge_into(out, _judge_settings(failing.url, max_retries=2, concurrency=1))
    message = str(err.value)
    assert "HTTP 502" in message and "3 attempt(s)" in message and "prompt 2" in message
    assert "2 of 6 pairs judged" in message and str(out / "verdicts.jsonl") in message
    assert len(failing.requests) == 4 + 3  # two pairs in both orders, then pair 2's first ask three times
    assert max(failing.seen.values()) == 3
    kept = _rows(out / "verdicts.jsonl")
    assert [row["index"] for row in kept] == [0, 1] and [row["winner"] for row in kept] == ["a", "b"]
    assert [row["winner"] for row in _rows(out / "judgments.jsonl")] == RIGHT[:2]

    healthy = stub("ok")
    result = _judge_into(out, _judge_settings(healthy.url, max_retries=2, concurrency=2))
    assert result["judged"] == 6 and result["asked"] == 4 and result["reused"] == 2
    assert len(healthy.requests) == 4 * 2  # the four missing pairs, both orders; none asked again
    assert [row["winner"] for row in _rows(out / "judgments.jsonl")] == RIGHT
    assert len(_rows(out / "verdicts.jsonl")) == 6

    # Another judge model never reuses them: all 6 pairs are asked again.
    other = stub("ok")
    result = _judge_into(out, _judge_settings(other.url, model="another-judge"))
    assert result["asked"] == 6 and result["reused"] == 0 and len(other.requests) == 12


def test_http_judge_concurrency_is_bounded(stub, tmp_path):
    server = stub("ok", delay=0.15)
    result = _judge_into(tmp_path / "eval", _judge_settings(server.url, concurrency=3, both_orders=False))
    assert result["judged"] == 6 and len(server.requests) == 6
    assert 1 < server.max_in_flight <= 3
    assert [row["winner"] for row in _rows(tmp_path / "eval" / "judgments.jsonl")] == RIGHT

    one = stub("ok", delay=0.05)
    _judge_into(tmp_path / "eval1", _judge_settings(one.url, concurrency=1, both_orders=False))
    assert one.max_in_flight == 1


@pytest.mark.parametrize("status, expected", [(401, "refused the key in \\$ALIGNMENT_TEST_JUDGE_KEY"),
                                              (404, "HTTP 404"), (400, "HTTP 400")])
def test_client_errors_are_not_retried(stub, tmp_path, monkeypatch, status, expected):
    monkeypatch.setenv("ALIGNMENT_TEST_JUDGE_KEY", "sk-refused-789-abcdef")
    server = stub("ok", fail_after=0, fail_status=status)
    with pytest.raises(JudgeError, match=expected) as err:
        _judge_into(tmp_path / "eval", _judge_settings(server.url, max_retries=5, concurrency=1))
    assert len(server.requests) == 1 and "Not retried" in str(err.value) and server.url in str(err.value)
    assert "sk-refused-789-abcdef" not in str(err.value)  # the 401 body quoted the key; the message does not


def test_http_settings_are_checked():
    from alignment.errors import ConfigError
    from alignment.evaluation.judges import check_judge

    check_judge(_judge_settings("http://localhost:8000/v1"))
    for key, value in [("max_retries", -1), ("concurrency", 0), ("backoff_s", -0.5), ("max_retries", 1.5)]:
        with pytest.raises(ConfigError, match=f"eval.judge.{key} must be"):
            check_judge(_judge_settings("http://localhost:8000/v1", **{key: value}))
    with pytest.raises(ConfigError, match="backoff_max_s=0.1 is below"):
        check_judge(_judge_settings("http://localhost:8000/v1", backoff_s=1.0, backoff_max_s=0.1))


def test_http_judge_cli_rerun_asks_only_for_the_rest_and_never_writes_the_key(stub, tmp_path):
    """Two real `stage=eval` runs of the tiny model into one run dir. The first meets a server that answers the
    first pair, then 401 with the key echoed in its body: exit 1, one line, that pair kept. The same command
    again, against a server that answers 429 then 502 before each success, asks only for the other two pairs.
    The key, from a variable whose name the generic secret filter does not know, is in no file and no output."""
    from alignment.preflight.compose import compose_run_config
    from alignment.models.start import resolve_start

    from .conftest import run_cli

    key = "sk-judge-never-saved-4567"
    tiny = resolve_start(compose_run_config([])).weights  # the tiny twin, as a checkpoint to evaluate
    run_dir = tmp_path / "ev"
    command = ["stage=eval", f"model.name_or_path={tiny}", "eval.preference=false", "judge=http",
               "eval.judge.model=judge-stub", "eval.judge.api_key_env=MY_JUDGE_CREDS", "eval.judge.backoff_s=0.01",
               "eval.judge.backoff_max_s=0.3", "eval.generation.num_prompts=3", "eval.generation.max_new_tokens=4",
               f"run_dir={run_dir}"]
    refusing = stub("ok", fail_after=2, fail_status=401)  # both orders of pair 0, then 401
    first = run_cli(*command, f"eval.judge.url={refusing.url}", "eval.judge.concurrency=1", cwd=tmp_path,
                    env={"MY_JUDGE_CREDS": key}, timeout=300)
    assert first.returncode == 1 and "Traceback" not in first.stderr
    assert "refused the key in $MY_JUDGE_CREDS" in first.stderr and "1 of 3 pairs judged" in first.stderr
    assert len(refusing.requests) == 3  # pair 0 twice, pair 1 once: a 401 is not retried
    assert all(r["headers"]["authorization"] == f"Bearer {key}" for r in refusing.requests)
    assert len(_rows(run_dir / "eval" / "verdicts.jsonl")) == 1
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["judge"]["status"] == "failed" and report["judge"]["judged"] == 1

    flaky = stub("ok", script=(429, 502), retry_after="0.05")
    assert "resume=true" in first.stderr
    second = run_cli(*command, f"eval.judge.url={flaky.url}", "resume=true", cwd=tmp_path,
                     env={"MY_JUDGE_CREDS": key}, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    asked = {r["body"]["messages"][1]["content"].split("\n")[1] for r in flaky.requests}
    first_asked = {r["body"]["messages"][1]["content"].split("\n")[1] for r in refusing.requests[:2]}
    assert len(asked) == 2 and not asked & first_asked  # the two missing prompts only
    # 2 pairs x 2 orders answered, plus a 429 and a 502 for each distinct request (the model is its own
    # reference here, so its two answers may be equal and both orders one request).
    assert len(flaky.requests) == 2 * 2 + 2 * len(flaky.seen)
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["judge"]["status"] == "finished" and report["judge"]["judged"] == 3
    assert report["judge"]["reused"] == 1 and report["judge"]["asked"] == 2
    assert [row["index"] for row in _rows(run_dir / "eval" / "judgments.jsonl")] == [0, 1, 2]

    for output in (first.stdout, first.stderr, second.stdout, second.stderr):
        assert key not in output
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {"verdicts.jsonl", "run.log", "summary.json", "config.yaml"} <= {path.name for path in files}
    for path in files:
        assert key not in path.read_text(errors="ignore"), path


@pytest.mark.slow
def test_failing_http_judge_keeps_the_generations_and_exits_1(demo_run, stub, tmp_path):
    """A malformed judge answer stops the evaluation with one clear line; the generations are already on disk."""
    server = stub("malformed")
    run_dir = tmp_path / "ev"
    result = run_cli("stage=eval", f"parent_run={demo_run['dir'] / '2-dpo'}", "eval.preference=false",
                     "judge=http", f"eval.judge.url={server.url}", "eval.judge.model=judge-stub",
                     "eval.generation.num_prompts=6", "eval.generation.max_new_tokens=8", f"run_dir={run_dir}",
                     cwd=tmp_path, env={"OPENAI_API_KEY": "sk-never-saved-456"})
    assert result.returncode == 1
    assert "gave no verdict" in result.stderr and "eval/generations.jsonl" in result.stderr
    assert "0 of 6 pairs judged" in result.stderr
    assert "Traceback" not in result.stderr
    generations = (run_dir / "eval" / "generations.jsonl").read_text().splitlines()
    assert len(generations) == 6 and all(json.loads(g)["policy"] is not None for g in generations)
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["status"] == "failed" and report["judge"]["status"] == "failed"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "gave no verdict" in summary["error"]
    # Stopped at the first bad answer: only the pairs already in flight (concurrency 4) were asked, once each.
    assert len(server.requests) <= 4
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert "sk-never-saved-456" not in path.read_text(errors="ignore"), path


# ----------------------------------------------------------------------------- adapters

EVAL_SHORT = ["eval.after_training=true", "judge=rule", "eval.generation.num_prompts=4",
              "eval.generation.max_new_tokens=8"]


@pytest.mark.slow
@pytest.mark.parametrize("parent", [None, "lora_sft_run"], ids=["fresh adapter, ref=base", "kept adapter, ref=adapter_copy"])
def test_adapter_runs_are_evaluated_against_their_reference(tmp_path, request, parent):
    """A LoRA DPO run: the candidate is its adapter; the reference is the bare base (fresh adapter) or the
    parent's SFT adapter on the same base (kept adapter), loaded once and switched."""
    from alignment.preflight.compose import compose_run_config
    from alignment.runner import evaluate_after_training

    from .conftest import SHORT_DPO, train

    extra = [f"parent_run={request.getfixturevalue(parent)}"] if parent else []
    outcome = train(tmp_path, "dpo", *SHORT_DPO, "peft=lora", *extra, *EVAL_SHORT)
    cfg = compose_run_config([*SHORT_DPO, "peft=lora", *extra, *EVAL_SHORT, f"run_dir={outcome.run.path}"])
    report = evaluate_after_training(cfg)
    assert report["candidate"]["adapter"] == str(outcome.run.model)
    option = outcome.summary["reference"]["option"]
    if parent:
        assert option == "adapter_copy" and report["reference"]["adapter"] == str(Path(request.getfixturevalue(parent))
                                                                                   / "model")
    else:
        assert option == "base" and report["reference"]["adapter"] is None
    assert report["reference"]["weights"] == report["candidate"]["weights"]  # one base
    preference = report["preference"]
    assert preference["before"]["accuracy"] == 0.5 and preference["before"]["ties"] == preference["pairs"]
    assert preference["after"]["ties"] < preference["pairs"]  # the trained adapter is not its reference
    assert json.loads((outcome.run.summary).read_text())["evaluation"]["status"] == "finished"


# ----------------------------------------------------------------------------- lm-evaluation-harness hook

FAKE_HARNESS = """
import json, os

def simple_evaluate(**kwargs):  # stands in for lm_eval.simple_evaluate: records the call, returns its shape
    with open(os.environ["FAKE_HARNESS_CALLS"], "a") as f:
        f.write(json.dumps(kwargs) + "\\n")
    return {"results": {task: {"acc,none": 0.25, "alias": task} for task in kwargs["tasks"]}}
"""


@pytest.mark.slow
def test_lm_eval_tasks_run_on_the_evaluated_model(demo_run, tmp_path):
    """The harness is called with the trained model's weights and settings; its results reach report and summary."""
    import os

    site = tmp_path / "site" / "lm_eval"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text(FAKE_HARNESS)
    calls = tmp_path / "calls.jsonl"
    dpo = demo_run["dir"] / "2-dpo"
    result = run_cli("stage=eval", f"parent_run={dpo}", "eval.preference=false", "eval.generation.num_prompts=2",
                     "eval.generation.max_new_tokens=4", "eval.lm_eval_tasks=[arc_easy,hellaswag]",
                     "eval.lm_eval_limit=5", f"run_dir={tmp_path / 'ev'}", cwd=tmp_path,
                     env={"PYTHONPATH": f"{site.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                          "FAKE_HARNESS_CALLS": str(calls)})
    assert result.returncode == 0, result.stderr[-3000:]
    (call,) = [json.loads(line) for line in calls.read_text().splitlines()]
    assert call["model"] == "hf" and call["tasks"] == ["arc_easy", "hellaswag"] and call["limit"] == 5
    assert call["model_args"] == f"pretrained={dpo / 'model'},dtype=float32" and call["device"] == "cpu"
    report = json.loads((tmp_path / "ev" / "eval" / "report.json").read_text())
    assert report["lm_eval"]["results"]["arc_easy"]["acc,none"] == 0.25
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["evaluation"]["lm_eval"]["hellaswag"]
    assert "lm-eval arc_easy: acc,none 0.2500" in result.stdout


@pytest.mark.slow
def test_eval_of_an_sft_run_on_chat_data_answers_its_prompts(demo_run, tmp_path):
    """Without preference pairs (chat data, eval.preference=false) the prompts come from the chat eval split."""
    sft = demo_run["dir"] / "1-sft"
    result = run_cli("stage=eval", f"parent_run={sft}", "dataset=tiny_sft", "eval.preference=false", "judge=rule",
                     "eval.generation.num_prompts=3", "eval.generation.max_new_tokens=8", f"run_dir={tmp_path / 'ev'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "ev" / "eval" / "report.json").read_text())
    assert report["preference"] == {"skipped": "eval.preference=false"}
    rows = [json.loads(line) for line in (tmp_path / "ev" / "eval" / "generations.jsonl").read_text().splitlines()]
    test_sft = [json.loads(line) for line in (__import__("alignment.config.schema", fromlist=["FIXTURES_DIR"]).FIXTURES_DIR
                                             / "tiny_ultrachat" / "test_sft.jsonl").read_text().splitlines()]
    # Each prompt is a test_sft dialogue up to its last assistant turn; the SFT run's reference is its base.
    assert [r["prompt"][-1]["role"] for r in rows] == ["user"] * 3
    for row in rows:
        assert any(row["prompt"] == t["messages"][:len(row["prompt"])] for t in test_sft), row["prompt"]
    assert report["reference"]["weights"] != str(sft / "model") and report["judge"]["judged"] == 3
