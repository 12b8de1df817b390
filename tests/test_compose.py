"""Every option of every config group composes into a valid RunConfig, or fails with the intended message."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from alignment.preflight.compose import compose_run_config, config_groups, group_options
from alignment.errors import ConfigError
from alignment.config.schema import RunConfig
from alignment.data import data_format
from alignment.plan.memory import parameter_count
from alignment.config.registry import stage_of
from alignment.preflight.validation import validate

from .conftest import run_cli, skip_without_the_real_model


def _combinations():
    # ref options depend on peft and the parent run; backends and trackers are orthogonal to the rest, and
    # presets set the other groups themselves (tests/test_presets.py): each has its own test.
    # The preference methods beyond DPO read what DPO reads: their combinations run on one model, and the dataset
    # options that only name the tiny fixture for them (tiny_orpo, ...) are left out.
    groups = [g for g in config_groups() if g not in ("ref", "backend", "tracker", "judge", "experiment")]
    combinations = [dict(zip(groups, choice)) for choice in itertools.product(*(group_options(g) for g in groups))]
    return [c for c in combinations if c["dataset"] not in {f"tiny_{s}" for s in _OTHER_METHODS}
            and (c["stage"] not in _OTHER_METHODS or c["model"] == "tiny_qwen2")]


_OTHER_METHODS = ("orpo", "kto", "cpo", "simpo")
# Stage options whose stage has another name (stage=simpo is the cpo stage with SimPO's loss).
_STAGE_OF_OPTION = {"simpo": "cpo"}


def test_conf_has_the_groups_of_the_product():
    assert {"model", "stage", "dataset", "backend", "peft", "ref", "tracker", "judge", "experiment"} <= set(config_groups())
    assert {"tiny_qwen2", "tiny_mistral", "mistral7b", "qwen72b"} <= set(group_options("model"))


# The fast tier composes every combination for two models (a twin and a hub preset); CI runs all of them.
_FAST_MODELS = ("tiny_qwen2", "qwen72b")


@pytest.mark.parametrize("choice", [c if c["model"] in _FAST_MODELS else pytest.param(c, marks=pytest.mark.slow)
                                    for c in _combinations()],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_combination_composes(choice, planning, tmp_path):
    skip_without_the_real_model(choice["model"])
    overrides = [f"{group}={option}" for group, option in choice.items()] + ["dry_run=true"]
    if choice["stage"] == "eval":  # stage=eval evaluates a trained model: a parent run's
        overrides.append(f"parent_run={finished_parent(tmp_path)}")
    cfg = compose_run_config(overrides)
    assert isinstance(cfg, RunConfig)
    assert cfg.stage.name == _STAGE_OF_OPTION.get(choice["stage"], choice["stage"])
    assert cfg.model.name == choice["model"]
    if data_format(cfg.dataset) == stage_of(cfg).data_format:
        validate(cfg)
    else:
        with pytest.raises(ConfigError, match=f"stage={cfg.stage.name} (trains|evaluates) on"):
            validate(cfg)


@pytest.mark.parametrize("backend", group_options("backend"))
@pytest.mark.parametrize("model", group_options("model"))
def test_every_backend_composes_and_validates_for_every_model(backend, model, planning):
    skip_without_the_real_model(model)
    for stage in ("sft", "dpo"):
        cfg = compose_run_config([f"backend={backend}", f"model={model}", f"stage={stage}", "dry_run=true"])
        assert cfg.backend.name == backend
        assert (cfg.backend.fsdp is not None) == (backend == "fsdp")
        assert (cfg.backend.zero3 is not None) == (backend == "zero3")
        validate(cfg)


@pytest.mark.parametrize("tracker", group_options("tracker"))
def test_every_tracker_composes_and_validates(tracker):
    cfg = compose_run_config([f"tracker={tracker}", "stage=dpo", "dry_run=true"])
    assert cfg.tracker.name == tracker
    validate(cfg)


def finished_parent(tmp_path):
    """A finished run dir with a saved model, as stage=eval's parent_run (what validation reads of it)."""
    parent = tmp_path / "parent"
    (parent / "model").mkdir(parents=True, exist_ok=True)
    (parent / "summary.json").write_text('{"status": "finished"}')
    (parent / "model" / "config.json").write_text("{}")
    return parent


JUDGE_NEEDS = {"http": "judge=http needs eval.judge.url", "reward_model": "judge=reward_model needs eval.judge.path"}


@pytest.mark.parametrize("judge", group_options("judge"))
def test_every_judge_composes_and_validates_or_says_what_it_needs(judge, tmp_path):
    evaluated = f"parent_run={finished_parent(tmp_path)}"
    cfg = compose_run_config(["stage=eval", f"judge={judge}", "dry_run=true", evaluated])
    assert cfg.eval.judge.name == judge
    if judge in JUDGE_NEEDS:
        with pytest.raises(ConfigError, match=JUDGE_NEEDS[judge]):
            validate(cfg)
        extra = ["eval.judge.url=http://localhost:8000/v1", "eval.judge.model=m"] if judge == "http" else \
            ["eval.judge.path=some/reward-model"]
        cfg = compose_run_config(["stage=eval", f"judge={judge}", "dry_run=true", evaluated, *extra])
    validate(cfg)


REF_ERRORS = {("adapter_copy", "none"): "ref=adapter_copy needs", ("adapter_copy", "lora"): "ref=adapter_copy needs",
              ("adapter_copy", "qlora"): "ref=adapter_copy needs", ("base", "none"): "ref=base disables",
              ("separate", "none"): "ref=separate needs ref.path", ("separate", "lora"): "ref=separate needs ref.path",
              ("separate", "qlora"): "ref=separate needs ref.path"}


@pytest.mark.parametrize("ref", group_options("ref"))
@pytest.mark.parametrize("peft", group_options("peft"))
def test_ref_options_compose_and_validate_or_say_what_they_need(ref, peft):
    cfg = compose_run_config(["stage=dpo", f"peft={peft}", f"ref={ref}", "dry_run=true"])
    assert cfg.ref.name == ref
    if (ref, peft) in REF_ERRORS:
        with pytest.raises(ConfigError, match=REF_ERRORS[ref, peft]):
            validate(cfg)
    else:
        validate(cfg)


def test_run_config_is_frozen():
    cfg = compose_run_config([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.stage.max_steps = 3


def test_short_keys_reach_the_run_config():
    cfg = compose_run_config(["stage=dpo", "beta=0.05", "learning_rate=1e-6", "seed=7"])
    assert (cfg.beta, cfg.learning_rate, cfg.seed) == (0.05, 1e-6, 7)


def test_stage_sets_its_own_learning_rate_default():
    assert compose_run_config(["stage=sft"]).learning_rate == 2e-5
    assert compose_run_config(["stage=dpo"]).learning_rate == 5e-7


@pytest.mark.parametrize("name, expected", [("mistral7b", 7_241_732_096), ("llama3_8b", 8_030_261_248), ("qwen72b", 72_706_203_648)])
def test_architecture_facts_count_the_real_parameters(name, expected):
    """The YAML facts, instantiated on the meta device from the real transformers classes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = compose_run_config([f"model={name}"]).model.architecture
    fields = {f.name: getattr(arch, f.name) for f in dataclasses.fields(arch) if getattr(arch, f.name) is not None}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == expected == parameter_count(arch)


def test_help_lists_every_group_and_option(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for group in config_groups():
        assert group in result.stdout
        for option in group_options(group):
            assert option in result.stdout
