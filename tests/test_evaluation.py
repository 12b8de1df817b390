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

    from alignment.compose import compose_run_config
    from alignment.evaluation.scoring import response_logps, tokenize
    from alignment.start import resolve_start

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
    from alignment.config import ConfigError

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
    """An OpenAI-compatible /v1/chat/completions on localhost whose behaviour each test chooses."""

    def __init__(self, mode: str):
        self.mode, self.requests = mode, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if stub.mode == "slow":
                    time.sleep(2)
                user = body["messages"][-1]["content"]
                # The stub prefers the answer with the right sum, like a good judge would.
                first = user.split("[The Start of Assistant A's Answer]\n")[1].split("\n")[0]
                verdict = "[[A]]" if "= 12." in first else "[[B]]"
                text = {"ok": f"Assistant {verdict[2]} is correct. {verdict}", "malformed": "I cannot decide."}.get(
                    stub.mode, "")
                payload = {"choices": [{"message": {"role": "assistant", "content": text}}]}
                data = (b"not json" if stub.mode == "garbage" else json.dumps(payload).encode())
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def start(mode: str) -> _Stub:
        servers.append(_Stub(mode))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _judge_settings(url: str, **extra):
    from alignment.config import JudgeConfig

    return JudgeConfig(name="http", url=url, model="judge-stub", api_key_env="ALIGNMENT_TEST_JUDGE_KEY",
                       timeout_s=extra.pop("timeout_s", 5.0), **extra)


def test_http_judge_sends_well_formed_requests_and_parses_verdicts(stub, monkeypatch):
    server = stub("ok")
    monkeypatch.setenv("ALIGNMENT_TEST_JUDGE_KEY", "sk-test-judge-123")
    judge = HttpJudge(_judge_settings(server.url))
    verdict = judge.compare(QUESTION, "7 + 5 = 12.", "7 + 5 = 13.", index=3)
    assert verdict.winner == "a" and verdict.detail["orders"] == ["a", "a"]  # the same verdict in both orders
    assert len(server.requests) == 2
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test-judge-123"
    body = request["body"]
    assert body["model"] == "judge-stub" and body["temperature"] == 0
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
    judge = HttpJudge(_judge_settings(server.url, timeout_s=0.5))
    with pytest.raises(JudgeError, match=message) as err:
        judge.compare(QUESTION, "7 + 5 = 12.", "7 + 5 = 13.", index=5)
    assert "prompt 5" in str(err.value) and server.url in str(err.value)


def test_unreachable_judge_is_a_clear_error():
    judge = HttpJudge(_judge_settings("http://127.0.0.1:9/v1", timeout_s=2))
    with pytest.raises(JudgeError, match="cannot be reached"):
        judge.compare(QUESTION, "a", "b")


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
    assert "Traceback" not in result.stderr
    generations = (run_dir / "eval" / "generations.jsonl").read_text().splitlines()
    assert len(generations) == 6 and all(json.loads(g)["policy"] is not None for g in generations)
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["status"] == "failed" and report["judge"]["status"] == "failed"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "gave no verdict" in summary["error"]
    assert len(server.requests) == 1  # stopped at the first bad answer
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
    from alignment.compose import compose_run_config
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
    test_sft = [json.loads(line) for line in (__import__("alignment.config", fromlist=["FIXTURES_DIR"]).FIXTURES_DIR
                                             / "tiny_ultrachat" / "test_sft.jsonl").read_text().splitlines()]
    # Each prompt is a test_sft dialogue up to its last assistant turn; the SFT run's reference is its base.
    assert [r["prompt"][-1]["role"] for r in rows] == ["user"] * 3
    for row in rows:
        assert any(row["prompt"] == t["messages"][:len(row["prompt"])] for t in test_sft), row["prompt"]
    assert report["reference"]["weights"] != str(sft / "model") and report["judge"]["judged"] == 3
