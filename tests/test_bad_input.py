"""Bad input: exit code 2, one message naming the key and what to do, nothing trained or written."""

from __future__ import annotations

import json
import os

import pytest

from .conftest import REPO, run_cli

FIXTURE_SFT = REPO / "alignment" / "fixtures" / "tiny_ultrachat"

CASES = {
    "unknown group option": (["model=gpt5"], "Valid options: mistral7b, qwen72b, smollm2_135m, tiny_mistral, tiny_qwen2"),
    "mandatory value missing": (["model.name_or_path=???"], "model.name_or_path is mandatory"),
    "beta zero": (["stage=dpo", "beta=0"], "beta must be > 0"),
    "beta negative": (["beta=-0.1"], "beta must be > 0"),
    "learning rate zero": (["stage=sft", "learning_rate=0"], "learning_rate must be > 0"),
    "dpo on chat data": (["stage=dpo", "dataset=tiny_sft"], "stage=dpo trains on preference data"),
    "hub model offline": (["model=mistral7b", "stage=sft", "offline=true"], "use model=tiny_qwen2"),
    "missing local model": (["stage=sft", "model=tiny_qwen2", "model.tiny=false", "model.name_or_path=./nowhere"],
                            "model.name_or_path=./nowhere does not exist"),
    "misspelt key": (["betta=0.1"], "Did you mean beta?"),
    "wrong type": (["learning_rate=fast"], "learning_rate"),
    "mix fraction out of range": (["stage=dpo", "dataset.mix=[{name: b, schema: orpo, path: x.jsonl, fraction: 1.5}]"],
                                  "dataset.mix[0].fraction must be in (0, 1]"),
    "prompt budget over max_length": (["stage=dpo", "stage.max_length=256"],
                                      "stage.max_prompt_length must be null or in [1, stage.max_length)"),
    "hub dataset offline": (["stage=dpo", "dataset=ultrafeedback_binarized", "offline=true"],
                            "--local-dir data/ultrafeedback_binarized"),
    "lora target absent": (["peft=lora", "peft.target_modules=[q_proj,attn_out]"],
                           "names attn_out, which tiny_qwen2 (qwen2) does not have. Its linear layers are: "
                           "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    "separate reference without path": (["stage=dpo", "ref=separate"], "ref=separate needs ref.path"),
    "adapter_copy without an adapter parent": (["stage=dpo", "peft=lora", "ref=adapter_copy"],
                                               "ref=adapter_copy needs a policy that starts from a parent"),
    "base reference with full fine-tuning": (["stage=dpo", "ref=base"], "ref=base disables the LoRA adapter"),
    "architecture facts missing": (["model=mistral7b", "model.architecture.hidden_size=???",
                                    "model.architecture.vocab_size=???", "dry_run=true"],
                                   "model mistral7b is missing architecture facts: hidden_size, vocab_size"),
    "unknown model type": (["model.architecture.model_type=gpt9"], "model_type=gpt9 is not a model type"),
    "bad sweep member": (["--multirun", "beta=0.1,-1"], "sweep member [beta=-1]: beta must be > 0"),
    "global batch does not divide": (["stage=dpo", "backend=ddp", "launcher.num_processes=3"],
                                     "stage.global_batch_size=32 does not split into micro batches of 8 "
                                     "(stage.per_device_train_batch_size) on 3 processes: 32 is not a multiple of "
                                     "8 × 3 = 24. Nearest valid settings: stage.global_batch_size=24, "
                                     "stage.global_batch_size=48, launcher.num_processes=2, launcher.num_processes=4"),
    "micro batch does not divide": (["stage=sft", "backend=fsdp", "launcher.num_processes=2",
                                     "stage.per_device_train_batch_size=6"],
                                    "Nearest valid settings: stage.global_batch_size=504, "
                                    "stage.global_batch_size=516, stage.per_device_train_batch_size=4, "
                                    "stage.per_device_train_batch_size=8"),
    "single backend with several processes": (["backend=single", "launcher.num_processes=2"],
                                              "backend=single runs one process"),
    "fsdp wrap class not in the model": (["backend=fsdp", "backend.fsdp.wrap_class=LlamaDecoderLayer"],
                                         "backend.fsdp.wrap_class=LlamaDecoderLayer is not a module class of "
                                         "tiny_qwen2 (qwen2). Its layer classes: Qwen2DecoderLayer"),
    "backend name without its settings": (["backend.name=zero3"], "choose the config group instead, `backend=zero3`"),
    "http judge without url": (["stage=eval", "judge=http", "eval.judge.model=m"],
                               "judge=http needs eval.judge.url, the base URL of an OpenAI-compatible API (e.g. "
                               "http://localhost:8000/v1)."),
    "http judge url not http": (["stage=eval", "judge=http", "eval.judge.url=localhost:8000", "eval.judge.model=m"],
                                "judge=http needs eval.judge.url, the base URL of an OpenAI-compatible API"),
    "unknown judge rule": (["stage=eval", "judge=rule", "eval.judge.rule=length"],
                           "eval.judge.rule=length is neither a built-in rule (arithmetic) nor `package.module:function`"),
    "unloadable judge rule": (["stage=eval", "judge=rule", "eval.judge.rule=nowhere.rules:score"],
                              "eval.judge.rule=nowhere.rules:score cannot be loaded"),
    "prompts file missing": (["stage=eval", "eval.generation.prompts=prompts.jsonl"],
                             "eval.generation.prompts=prompts.jsonl is not a file"),
    "eval on several processes": (["stage=eval", "backend=ddp"], "stage=eval runs in one process"),
    "eval parent missing": (["stage=eval", "parent_run=outputs/nowhere"], "parent_run=outputs/nowhere does not exist"),
    "judge checked before training": (["stage=dpo", "eval.after_training=true", "judge=rule",
                                       "eval.judge.rule=length"], "eval.judge.rule=length is neither"),
    "processes not a multiple of machines": (["backend=ddp", "launcher.num_processes=3", "launcher.num_machines=2"],
                                             "does not spread evenly over launcher.num_machines=2"),
    "one data file but an eval split named": ([f"dataset.path={FIXTURE_SFT / 'train_sft.jsonl'}", "stage=sft"],
                                              "holds one split (used as dataset.train_split=train_sft), but "
                                              "dataset.eval_split=test_sft is also named"),
    "named split absent from a data dir": ([f"dataset.path={FIXTURE_SFT}", "stage=sft", "dataset.eval_split=dev"],
                                           "split 'dev' not found in"),
    "data file of another schema": ([f"dataset.path={FIXTURE_SFT}", "stage=dpo", "dataset.schema=ultrafeedback",
                                     "dataset.train_split=train_sft", "dataset.eval_split=test_sft"],
                                    "row 0 ("),
    "backend device cuda without CUDA": (["backend.device=cuda"], "backend.device=cuda but no CUDA device is visible"),
    "rerun of a missing run dir": (["rerun=outputs/nowhere"], "rerun="),
}


def _refusal(args: list[str]) -> str | None:
    """What the command's up-front checks say about a command line, in this process (no CLI start-up)."""
    from alignment.command_line import normalise
    from alignment.compose import preflight
    from alignment.config import ConfigError

    try:
        preflight(normalise(list(args)))
    except ConfigError as err:
        return str(err)
    return None


@pytest.mark.parametrize("args, message", CASES.values(), ids=CASES.keys())
def test_every_refusal_is_the_same_for_the_run_and_its_dry_run(tmp_path, monkeypatch, args, message):
    """The fast tier's form of the table below: the checks every command runs first, run and dry run compared."""
    monkeypatch.chdir(tmp_path)
    run_args = [a for a in args if a != "dry_run=true"]
    run, dry = _refusal(run_args), _refusal([*run_args, "dry_run=true"])
    assert run is not None and message.lower() in run.lower(), run
    assert dry == run


@pytest.mark.slow
@pytest.mark.parametrize("args, message", CASES.values(), ids=CASES.keys())
def test_bad_input_exits_2_with_a_clear_message_and_its_dry_run_identically(tmp_path, args, message):
    """Every refusal, asked of the run and of its dry run: the plan of a run that would be refused is worth nothing,
    so the dry run is refused with the same one line."""
    run_args = [a for a in args if a != "dry_run=true"]
    run, dry = run_cli(*run_args, cwd=tmp_path), run_cli(*run_args, "dry_run=true", cwd=tmp_path)
    for result in (run, dry):
        assert result.returncode == 2, (result.args, result.stdout[-2000:], result.stderr[-2000:])
        assert message.lower() in result.stderr.lower()
        assert result.stderr.count("alignment: error:") == 1
    errors = [[line for line in r.stderr.splitlines() if line.startswith("alignment: error:")] for r in (run, dry)]
    assert errors[0] == errors[1]
    assert not (tmp_path / "outputs").exists(), "nothing may be written for bad input"


@pytest.mark.slow  # the demo run it needs takes a minute
def test_eval_of_a_run_with_other_model_settings_is_refused(demo_run, tmp_path):
    result = run_cli("stage=eval", f"parent_run={demo_run['dir'] / '2-dpo'}", "model=tiny_mistral", cwd=tmp_path)
    assert result.returncode == 2
    assert "was trained with model=tiny_qwen2" in result.stderr and "Add model=tiny_qwen2" in result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow  # the demo run it needs takes a minute
def test_finished_run_dir_is_never_overwritten(demo_run, tmp_path):
    chain_dir = demo_run["dir"]
    before = {p: p.stat().st_mtime_ns for p in chain_dir.rglob("*") if p.is_file()}
    for args in ([f"run_dir={chain_dir}"], ["stage=sft", f"run_dir={chain_dir / '1-sft'}"]):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2
        assert "holds a finished run" in result.stderr and "never overwritten" in result.stderr
    assert before == {p: p.stat().st_mtime_ns for p in chain_dir.rglob("*") if p.is_file()}


@pytest.mark.slow  # the demo run it needs takes a minute
def test_resume_of_a_finished_run_is_refused(demo_run, tmp_path):
    result = run_cli("stage=sft", f"run_dir={demo_run['dir'] / '1-sft'}", "resume=true", cwd=tmp_path)
    assert result.returncode == 2 and "finished" in result.stderr


def test_chained_dpo_from_a_run_without_a_finished_model_is_refused(tmp_path):
    """Exit 2 before anything loads: a parent still running, and a finished parent that saved no model."""
    running, empty = tmp_path / "running", tmp_path / "empty"
    for parent, status in ((running, "running"), (empty, "finished")):
        parent.mkdir()
        (parent / "summary.json").write_text(json.dumps({"status": status}))
    work = tmp_path / "work"
    work.mkdir()
    for parent, message in ((running, "is not a finished run"), (empty, "has no saved model")):
        result = run_cli("stage=dpo", f"parent_run={parent}", cwd=work)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (work / "outputs").exists()


def _unimportable(tmp_path, package: str, message: str) -> dict:
    """Environment in which `import package` raises ImportError(message): a fake package first on PYTHONPATH."""
    fake = tmp_path / "site" / package
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"raise ImportError({message!r})\n")
    return {"PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


# An optional package that cannot be imported (absent, or no native library for this machine) stops the run
# before anything loads, and before any rank starts.
UNIMPORTABLE = {
    "qlora without bitsandbytes": (["stage=dpo", "peft=qlora"], "bitsandbytes", "no native library for this platform",
                                   ("peft=qlora needs bitsandbytes", "use peft=lora")),
    "zero3 without deepspeed": (["stage=dpo", "backend=zero3"], "deepspeed", "No module named deepspeed",
                                ("backend=zero3 needs DeepSpeed", "use backend=fsdp")),
    "wandb tracker without wandb": (["stage=dpo", "tracker=wandb"], "wandb", "No module named wandb",
                                    ("tracker=wandb needs the wandb package", "or use tracker=none")),
    "lm-eval tasks without the harness": (["stage=eval", "eval.lm_eval_tasks=[arc_easy]"], "lm_eval",
                                          "No module named lm_eval",
                                          ("needs the lm-evaluation-harness", "pip install lm-eval")),
}


@pytest.mark.parametrize("args, package, error, expected", UNIMPORTABLE.values(), ids=UNIMPORTABLE.keys())
@pytest.mark.slow
@pytest.mark.parametrize("dry_run", ["false", "true"])
def test_unimportable_optional_package_exits_2(tmp_path, args, package, error, expected, dry_run):
    result = run_cli(*args, f"dry_run={dry_run}", cwd=tmp_path, env=_unimportable(tmp_path, package, error))
    assert result.returncode == 2, result.stderr[-2000:]
    assert all(text in result.stderr for text in expected), result.stderr[-2000:]
    assert "launching" not in result.stdout
    assert not (tmp_path / "outputs").exists()


def test_more_processes_than_visible_gpus_exits_2(tmp_path):
    """On a machine with one GPU (simulated: torch reports one CUDA device), 4 processes are refused up front."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import torch\ntorch.cuda.is_available = lambda: True\ntorch.cuda.device_count = lambda: 1\n")
    result = run_cli("stage=dpo", "backend=ddp", "launcher.num_processes=4", "stage.per_device_train_batch_size=4",
                     cwd=tmp_path, env={"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "launcher.num_processes=4 on 1 machine(s) needs 4 GPUs per machine, but this machine shows 1" in result.stderr
    assert "Use launcher.num_processes=1" in result.stderr
    assert not (tmp_path / "outputs").exists()
