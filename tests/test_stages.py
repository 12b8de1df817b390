"""The stages beyond SFT and DPO (ORPO, KTO, CPO, SimPO) and the DPO loss family, checked against plain TRL.

- Each stage's per-step losses equal a plain-TRL script's (the trainer and its config built here, from the tiny twin
  the run started from, on the same prepared rows, every setting stated explicitly), and the step-1 loss has its
  closed form where policy = reference gives one.
- A KTO run resumed from its checkpoint ends as an uninterrupted one; a 2-process FSDP ORPO run matches one process.
- A method of one's own is one module and one YAML in a config dir of one's own, run end to end with the command.
- What the stages rely on in TRL's experimental API is pinned, and every stage YAML lists exactly its class's fields.

Tolerances: everything is fp32 on CPU, and both sides run the same operations on the same batches, so the losses
agree to rounding (measured: identical); 1e-5 absolute is far below what a wrong setting moves (1e-3 or more).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli, train
from tests.test_resume import CrashAtStep  # raises at the end of a step, before it is logged or saved

LOSS_TOLERANCE = 1e-5
STEPS, MICRO, LR, SEED, MAX_LENGTH = 3, 4, 1e-3, 42, 128
# Short runs on a 16-pair slice of the tiny preference fixture, no eval split, the schedule and optimizer stated.
SHORT = [f"stage.max_steps={STEPS}", f"stage.max_length={MAX_LENGTH}", "stage.max_prompt_length=64",
         f"stage.per_device_train_batch_size={MICRO}", f"stage.global_batch_size={MICRO}", f"learning_rate={LR}",
         f"seed={SEED}", "stage.lr_scheduler_type=linear", "stage.warmup_ratio=0", "stage.weight_decay=0",
         "stage.max_grad_norm=1.0", "stage.optim=adamw_torch", "stage.eval_steps=null", "dataset.eval_split=null",
         "stage.batching=random",  # TRL's own sampler: per-step parity (the default, length-aware, regroups batches)
         "dataset.rows=16"]


def _dpo(loss_type: str, **extra) -> tuple:
    return (["stage=dpo", f"stage.loss_type={loss_type}", *(f"stage.{k}={v}" for k, v in extra.items())],
            ("trl", "DPOTrainer", "DPOConfig"),
            # ref=auto on full weights is `precomputed`: TRL's own precompute, stated here as well.
            dict(beta=0.1, loss_type=[loss_type], label_smoothing=extra.get("label_smoothing", 0.0),
                 precompute_ref_log_probs=True))


# case → (our overrides, (module, trainer, config) of plain TRL, the method's settings stated for plain TRL)
CASES = {
    "orpo": (["stage=orpo"], ("trl.experimental.orpo", "ORPOTrainer", "ORPOConfig"), dict(beta=0.1)),
    "kto": (["stage=kto"], ("trl", "KTOTrainer", "KTOConfig"),
            dict(beta=0.1, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0,
                 precompute_ref_log_probs=True)),
    "cpo": (["stage=cpo"], ("trl.experimental.cpo", "CPOTrainer", "CPOConfig"),
            dict(beta=0.1, loss_type="sigmoid", cpo_alpha=1.0, simpo_gamma=0.5, label_smoothing=0.0)),
    # stage=simpo: the CPO trainer with SimPO's loss and princeton-nlp's mistral-7b-base values.
    "simpo": (["stage=simpo"], ("trl.experimental.cpo", "CPOTrainer", "CPOConfig"),
              dict(beta=2.0, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=1.6, label_smoothing=0.0)),
    "dpo-sigmoid": _dpo("sigmoid"),
    "dpo-ipo": _dpo("ipo"),
    "dpo-hinge": _dpo("hinge"),
    "dpo-robust": _dpo("robust", label_smoothing=0.1),
    "dpo-apo_zero": _dpo("apo_zero"),
}


def _composed(*overrides: str):
    from alignment.preflight.compose import compose_run_config
    from alignment.preflight.validation import validate

    cfg = compose_run_config(list(overrides))
    validate(cfg)
    return cfg


def _losses(log_history: list[dict]) -> list[float]:
    return [record["loss"] for record in log_history if "loss" in record]


def _in_memory(rows):
    """The same rows without cache files: plain TRL's tokenization and precompute then write nothing into the
    prepared-data cache entry that our runs verify."""
    from datasets import Dataset

    return Dataset.from_dict(rows.to_dict(), features=rows.features)


def _plain_trl(output_dir: Path, cfg, start_model: str, module: str, trainer_name: str, config_name: str,
               method: dict) -> list[float]:
    """The plain-TRL script: the trainer built directly on the prepared rows, every setting stated."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.data_utils import unpair_preference_dataset

    from alignment.data import prepare
    from alignment.models.modeling import load_tokenizer

    trl_module = importlib.import_module(module)
    trainer_class, config_class = getattr(trl_module, trainer_name), getattr(trl_module, config_name)
    tokenizer = load_tokenizer(start_model, cfg.model)
    rows = _in_memory(prepare(cfg, tokenizer).train)
    if trainer_name == "KTOTrainer":
        rows = unpair_preference_dataset(rows)  # each pair: its chosen (label true), then its rejected (false)
    model = AutoModelForCausalLM.from_pretrained(start_model, dtype=torch.float32, attn_implementation="sdpa")
    args = config_class(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=MICRO, gradient_accumulation_steps=1,
        learning_rate=LR, max_length=MAX_LENGTH, seed=SEED, data_seed=SEED, lr_scheduler_type="linear",
        warmup_steps=0.0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False,  # TRL's configs default bf16 to None and gradient checkpointing to True
        disable_tqdm=True, dataloader_num_workers=0, **method)
    trainer = trainer_class(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    return _losses(trainer.state.log_history)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_stage_losses_equal_plain_trl(tmp_path, case):
    from alignment.config.registry import stage_of

    overrides, (module, trainer_name, config_name), method = CASES[case]
    run_dir = tmp_path / "ours"
    cfg = _composed(*overrides, *SHORT, f"run_dir={run_dir}")
    outcome = train(tmp_path, "ours", *overrides, *SHORT)
    assert outcome.summary["status"] == "finished"
    assert outcome.summary["batch"] == {"global": MICRO, "micro": MICRO, "accumulation": 1, "processes": 1}
    assert isinstance(outcome.trainer, getattr(importlib.import_module(module), trainer_name))
    # The stage's settings are the ones stated for plain TRL (beta, loss type, weights, ...).
    settings = outcome.summary["stage_settings"]
    for key, value in method.items():
        if key in settings:
            assert settings[key] == (value[0] if isinstance(value, list) else value), key
    ours = _losses(outcome.trainer.state.log_history)
    assert len(ours) == STEPS

    theirs = _plain_trl(tmp_path / "plain", cfg, outcome.summary["start_model"], module, trainer_name, config_name,
                        method)
    assert ours == pytest.approx(theirs, abs=LOSS_TOLERANCE)
    assert ours[-1] != pytest.approx(ours[0], abs=1e-4), "it trained: the loss moved"

    stage = stage_of(cfg)
    if case.startswith("dpo-"):
        expected = stage.initial_loss(cfg.stage)
        assert expected is not None
        assert ours[0] == pytest.approx(expected, abs=LOSS_TOLERANCE)
    elif case == "kto":
        # kto loss with equal weights at policy = reference: every reward and the KL estimate are 0, 1 - σ(0).
        assert ours[0] == pytest.approx(0.5, abs=LOSS_TOLERANCE)


RESUME = ["stage.max_steps=4", "stage.save_steps=2", *SHORT[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["kto", "orpo", "simpo"])  # the three new trainers (simpo is TRL's CPOTrainer)
def test_resume_matches_an_uninterrupted_run(tmp_path, stage):
    from alignment.runner import run_stage
    from alignment.records.tracking import read_metrics

    resume = [f"stage={stage}", *RESUME]
    straight = train(tmp_path, "straight", *resume)
    expected = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    assert [step for step, _ in expected] == [1, 2, 3, 4]

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(_composed(*resume, f"run_dir={crashed}"), callbacks=[CrashAtStep(3)])
    assert json.loads((crashed / "summary.json").read_text())["status"] == "failed"
    resumed = run_stage(_composed(*resume, f"run_dir={crashed}", "resume=true"))
    assert resumed.summary["status"] == "finished"
    assert resumed.summary["resumed_from"].endswith("checkpoint-2")

    logged = [(r["step"], r["loss"]) for r in read_metrics(crashed / "metrics.jsonl") if "loss" in r]
    assert [step for step, _ in logged] == [1, 2, 3, 4], "each step logged exactly once across crash and resume"
    after = [loss for step, loss in logged if step > 2]
    assert after == pytest.approx([loss for step, loss in expected if step > 2], abs=1e-6)
    assert resumed.summary["final_metrics"]["loss"] == pytest.approx(straight.summary["final_metrics"]["loss"],
                                                                      abs=1e-6)


FSDP_ORPO = ["stage=orpo", "stage.max_steps=3", f"stage.max_length={MAX_LENGTH}", "stage.max_prompt_length=64",
             "learning_rate=1e-3", "stage.warmup_ratio=0", "stage.global_batch_size=8",
             "stage.per_device_train_batch_size=4", "dataset.eval_split=null", "dataset.rows=32"]


def _cli_run(cwd: Path, *overrides: str) -> Path:
    cwd.mkdir()
    result = run_cli(*overrides, cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    run_dirs = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    return run_dirs[0]


def _metric_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _logits(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[5, 17, 200, 33, 400, 9, 77, 123, 8, 300]])).logits


@pytest.mark.slow
def test_orpo_under_fsdp_with_two_processes_matches_one_process(tmp_path):
    single = train(tmp_path, "single", *FSDP_ORPO).run.path  # in this process: the reference needs no launcher
    sharded = _cli_run(tmp_path / "fsdp", *FSDP_ORPO, "backend=fsdp", "launcher.num_processes=2")
    single_summary = json.loads((single / "summary.json").read_text())
    summary = json.loads((sharded / "summary.json").read_text())
    assert single_summary["batch"] == {"global": 8, "micro": 4, "accumulation": 2, "processes": 1}
    assert summary["batch"] == {"global": 8, "micro": 4, "accumulation": 1, "processes": 2}
    assert summary["status"] == "finished"
    engine = summary["distributed"]
    assert engine["world_size"] == 2 and engine["process_group"] == "gloo" and engine["distributed_type"] == "FSDP"
    shard = engine["shards"].get("model.embed_tokens.weight") or next(iter(engine["shards"].values()))
    assert shard["local"][0] * 2 == shard["global"][0], engine  # each rank holds half the rows: really sharded
    losses = _metric_losses(sharded)
    assert len(losses) == 3
    assert losses == pytest.approx(_metric_losses(single), abs=LOSS_TOLERANCE)
    assert (_logits(sharded / "model") - _logits(single / "model")).abs().max().item() < 5e-5


MY_METHOD = '''
"""A throwaway stage: DPO's trainer with the hinge loss, as a method of one's own."""
from dataclasses import dataclass

from alignment.config.schema import PreferenceStageConfig
from alignment.stages import common
from alignment.config.registry import Stage, register


@dataclass
class MyMethodConfig(PreferenceStageConfig):
    beta: float = 0.1
    loss_type: str = "hinge"


def build_trainer(cfg, run, start, callbacks=()):
    from trl import DPOConfig, DPOTrainer

    return common.build_trainer(cfg, run, start, callbacks, DPOConfig, DPOTrainer, beta=cfg.stage.beta,
                                loss_type=[cfg.stage.loss_type])


register(Stage(name="mymethod", config=MyMethodConfig, description="DPO with the hinge loss, as a test method",
               trainer="trl.DPOTrainer", data_format="preference", build_trainer=build_trainer,
               sequences_per_example=2, logit_bytes_per_vocab_entry=0, preference_metrics=True))
'''

MY_METHOD_YAML = """\
# @package _global_
learning_rate: 1.0e-3
beta: 0.1
stage:
  name: mymethod
  module: mymethod
  max_steps: -1
  num_train_epochs: 1
  per_device_train_batch_size: 4
  per_device_eval_batch_size: 4
  global_batch_size: 4
  max_length: 128
  max_prompt_length: 64
  lr_scheduler_type: linear
  warmup_ratio: 0.0
  weight_decay: 0.0
  max_grad_norm: 1.0
  optim: adamw_torch
  logging_steps: 1
  eval_steps: null
  save_steps: 500
  save_total_limit: 2
  loss_type: hinge
"""


def _error_lines(result) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("alignment: error")]


@pytest.mark.slow
def test_a_stage_of_ones_own_runs_from_a_module_and_a_yaml(tmp_path):
    (tmp_path / "mymethod.py").write_text(MY_METHOD)
    conf = tmp_path / "conf"
    (conf / "stage").mkdir(parents=True)
    (conf / "stage" / "mymethod.yaml").write_text(MY_METHOD_YAML)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    run_dir = tmp_path / "run"
    result = run_cli("--config-dir", str(conf), "stage=mymethod", "dataset=tiny_dpo", "stage.max_steps=2",
                     "dataset.eval_split=null", "dataset.rows=16", "beta=0.3", f"run_dir={run_dir}", cwd=tmp_path,
                     env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["stage"] == "mymethod"
    assert summary["stage_settings"]["beta"] == 0.3 and summary["stage_settings"]["loss_type"] == "hinge"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2]
    assert records[0]["loss"] == pytest.approx(1.0, abs=LOSS_TOLERANCE)  # hinge at policy = reference: relu(1 - 0)
    assert (run_dir / "model" / "config.json").exists() and (run_dir / "model" / "model.safetensors").exists()

    # A key the stage does not have is refused, for one's own stage as for a built-in one.
    unknown = run_cli("--config-dir", str(conf), "stage=mymethod", "dataset=tiny_dpo", "stage.packing=true",
                      cwd=tmp_path, env=env)
    assert unknown.returncode == 2 and len(_error_lines(unknown)) == 1 and "stage.packing" in _error_lines(unknown)[0]


def test_a_key_the_stage_does_not_have_is_refused(tmp_path):
    result = run_cli("stage=dpo", "stage.packing=true", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = _error_lines(result)
    assert len(errors) == 1 and "stage.packing" in errors[0], result.stdout + result.stderr


def test_a_short_key_the_stage_does_not_have_is_refused(tmp_path):
    result = run_cli("beta=0.5", "stage=sft", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = _error_lines(result)
    assert len(errors) == 1 and "beta=0.5" in errors[0] and "has no effect" in errors[0], errors
    assert not (tmp_path / "outputs").exists(), "refused before anything is written"


def test_what_the_stages_rely_on_in_trl():
    """TRL's experimental ORPO and CPO (and the stable KTO) as the stages use them; a TRL upgrade that moves them
    fails here, by name, instead of in a run."""
    import inspect

    from trl import DPOTrainer, KTOConfig, KTOTrainer
    from trl.data_utils import unpair_preference_dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from alignment.preflight.library_choices import loss_types
    from alignment.stages.common import _our_trainer_class
    from alignment.config.registry import stage_named

    def fields(config_class) -> set[str]:
        return {f.name for f in dataclasses.fields(config_class)}

    assert {"beta", "max_length"} <= fields(ORPOConfig)
    assert {"beta", "max_length", "loss_type", "cpo_alpha", "simpo_gamma", "label_smoothing"} <= fields(CPOConfig)
    assert {"beta", "max_length", "loss_type", "desirable_weight", "undesirable_weight",
            "precompute_ref_log_probs"} <= fields(KTOConfig)
    assert {"sigmoid", "hinge", "ipo", "simpo"} <= set(loss_types(stage_named("cpo").loss_types_from))
    assert {"kto", "apo_zero_unpaired"} <= set(loss_types(stage_named("kto").loss_types_from))
    assert {"sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down"} <= set(
        loss_types(stage_named("dpo").loss_types_from))
    for trainer_class in (ORPOTrainer, CPOTrainer, KTOTrainer):
        parameters = inspect.signature(trainer_class.__init__).parameters
        assert {"model", "args", "train_dataset", "eval_dataset", "processing_class", "peft_config",
                "callbacks"} <= set(parameters), trainer_class

    # ORPO and CPO tokenize in __init__ (no _prepare_dataset): our class guards the constructor instead.
    for trainer_class in (ORPOTrainer, CPOTrainer):
        assert not hasattr(trainer_class, "_prepare_dataset"), trainer_class
        ours = _our_trainer_class(trainer_class, None, "random", False)
        assert "__init__" in vars(ours) and "_prepare_dataset" not in vars(ours)
        assert ours.__name__ == trainer_class.__name__ and issubclass(ours, trainer_class)
    for trainer_class in (KTOTrainer, DPOTrainer):
        assert hasattr(trainer_class, "_prepare_dataset"), trainer_class
        ours = _our_trainer_class(trainer_class, None, "random", False)
        assert "_prepare_dataset" in vars(ours) and "__init__" not in vars(ours)

    # Length-aware batching and padding-free DPO (alignment/stages/batching.py, padding_free.py) rely on the trainer's
    # sampler hook, transformers' length-grouped sampler, and the fields of TRL's fused-LM-head output.
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl.trainer.utils import FusedCausalLMOutput

    from alignment.stages.padding_free import PER_TOKEN_FIELDS

    assert "train_dataset" in inspect.signature(Trainer._get_train_sampler).parameters
    assert {"batch_size", "dataset", "lengths", "generator"} <= set(inspect.signature(LengthGroupedSampler).parameters)
    assert set(PER_TOKEN_FIELDS) <= {f.name for f in dataclasses.fields(FusedCausalLMOutput)}
    ours = _our_trainer_class(DPOTrainer, None, "length", True)
    assert {"_get_train_sampler", "training_step"} <= set(vars(ours))

    assert stage_named("orpo").experimental == "trl.experimental.orpo"
    assert stage_named("cpo").experimental == "trl.experimental.cpo"
    assert stage_named("kto").experimental is None

    # KTO's rows: each pair becomes its chosen (label true), then its rejected (label false).
    from datasets import Dataset

    from alignment.stages.kto import unpaired

    pairs = Dataset.from_list([{"prompt": "p1", "chosen": "c1", "rejected": "r1"},
                               {"prompt": "p2", "chosen": "c2", "rejected": "r2"}])
    rows = unpaired(pairs)
    assert sorted(zip(rows["prompt"], rows["completion"], rows["label"])) == sorted(
        [("p1", "c1", True), ("p1", "r1", False), ("p2", "c2", True), ("p2", "r2", False)])
    assert unpair_preference_dataset(pairs, keep_in_memory=True)["label"].count(True) == 2


STAGE_YAMLS = sorted((REPO / "alignment" / "conf" / "stage").glob("*.yaml"))


@pytest.mark.parametrize("path", STAGE_YAMLS, ids=lambda p: p.stem)
def test_every_stage_yaml_lists_exactly_its_config_fields(path):
    """Every field of the stage's config class but `module` and the short key `beta` (set at top level), so users
    never need `+stage.x=`; and nothing the class does not have."""
    from alignment.config.registry import SHORT_KEYS, stage_named

    node = yaml.safe_load(path.read_text())
    stage_keys = node["stage"]
    stage = stage_named(stage_keys["name"], stage_keys.get("module"))
    expected = {f.name for f in dataclasses.fields(stage.config)} - {"module", *SHORT_KEYS}
    assert set(stage_keys) == expected, (f"{path.name}: missing {sorted(expected - set(stage_keys))}, "
                                         f"not in {stage.config.__name__}: {sorted(set(stage_keys) - expected)}")
    # A short key the stage has is set at top level (beta=...), where the built-in YAMLs give its default.
    for key in SHORT_KEYS:
        if key in {f.name for f in dataclasses.fields(stage.config)}:
            assert key in node, f"{path.name} gives no default for the short key {key}"


def test_the_stage_yamls_cover_every_built_in_stage():
    from alignment.config.registry import BUILT_IN

    names = {yaml.safe_load(p.read_text())["stage"]["name"] for p in STAGE_YAMLS}
    assert names == set(BUILT_IN)
    assert {p.stem for p in STAGE_YAMLS} == {*BUILT_IN, "simpo"}
