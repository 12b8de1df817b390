"""Bad input: exit code 2, one message naming the key and what to do, nothing trained or written."""

from __future__ import annotations

import json
import os

import pytest

from .conftest import REPO, run_cli

FIXTURE_SFT = REPO / "alignment" / "fixtures" / "tiny_ultrachat"

# Each case: the overrides, the key the one error line must name, and words of that line. Every case is refused with
# exit 2 before anything is written or any weights load, and its dry run with the same line.
CASES = {
    "unknown group option": (["model=gpt5"], "model",
                             "Valid options: llama3_8b, mistral7b, qwen72b, smollm2_135m, tiny_mistral, tiny_qwen2"),
    "mandatory value missing": (["model.name_or_path=???"], "model.name_or_path", "model.name_or_path is mandatory"),
    "beta zero": (["stage=dpo", "beta=0"], "beta", "beta must be > 0"),
    "beta negative": (["stage=kto", "beta=-0.1"], "beta", "beta must be > 0"),
    "beta on a stage without one": (["stage=sft", "beta=0.5"], "beta", "beta=0.5 has no effect on stage=sft"),
    "stage key of another stage": (["stage=dpo", "stage.packing=true"], "stage.packing",
                                   "stage.packing is not a setting of this stage (each stage has its own settings; stage.packing belongs to stage=sft)"),
    "loss type of another trainer": (["stage=cpo", "stage.loss_type=kto"], "stage.loss_type",
                                     "stage.loss_type=kto is not a loss type trl.experimental.cpo.CPOTrainer takes"),
    "kto from a kept adapter": (["stage=kto", "ref=adapter_copy", "peft=lora"], "ref",
                                "ref=adapter_copy is not supported by stage=kto"),
    "beta infinite": (["stage=dpo", "beta=inf"], "beta", "beta=inf is not a finite number: it must be > 0"),
    "beta nan": (["stage=dpo", "beta=nan"], "beta", "beta=nan is not a finite number"),
    "learning rate zero": (["stage=sft", "learning_rate=0"], "learning_rate", "learning_rate must be null or > 0"),
    "learning rate infinite": (["stage=dpo", "learning_rate=inf"], "learning_rate",
                               "learning_rate=inf is not a finite number"),
    "learning rate nan": (["stage=sft", "learning_rate=nan"], "learning_rate", "learning_rate=nan is not a finite"),
    "seed negative": (["seed=-1"], "seed", "seed must be in [0, 4294967295] (got -1)"),
    "seed beyond 32 bits": (["seed=4294967296"], "seed", "seed must be in [0, 4294967295]"),
    "dpo on chat data": (["stage=dpo", "dataset=tiny_sft"], "dataset", "stage=dpo trains on preference data"),
    "hub model offline": (["model=mistral7b", "stage=sft", "offline=true"], "model", "use model=tiny_qwen2"),
    "missing local model": (["stage=sft", "model=tiny_qwen2", "model.tiny=false", "model.name_or_path=./nowhere"],
                            "model.name_or_path", "model.name_or_path=./nowhere does not exist"),
    "misspelt key": (["betta=0.1"], "betta", "Did you mean beta?"),
    "wrong type": (["learning_rate=fast"], "learning_rate", "learning_rate"),
    "mix fraction out of range": (["stage=dpo", "dataset.mix=[{name: b, schema: orpo, path: x.jsonl, fraction: 1.5}]"],
                                  "dataset.mix[0].fraction", "dataset.mix[0].fraction must be in (0, 1]"),
    "mix eval_rows zero": (["stage=dpo", "dataset.mix=[{name: b, schema: orpo, path: x.jsonl, eval_rows: 0}]"],
                           "dataset.mix[0].eval_rows", "must be null or >= 1 (got 0)"),
    "prompt budget over max_length": (["stage=dpo", "stage.max_length=256"], "stage.max_prompt_length",
                                      "stage.max_prompt_length must be null or in [1, stage.max_length)"),
    "max_length beyond the model's positions": (["stage=dpo", "stage.max_length=100000"], "stage.max_length",
                                                "beyond the 2048 positions of model tiny_qwen2"),
    "max_length below 16 tokens": (["stage.max_length=8"], "stage.max_length", "stage.max_length must be >= 16"),
    "max_steps zero": (["stage.max_steps=0"], "stage.max_steps", "-1 (train for num_train_epochs) or > 0"),
    "epochs zero": (["stage.num_train_epochs=0"], "stage.num_train_epochs", "must be > 0"),
    "epochs infinite": (["stage.num_train_epochs=inf"], "stage.num_train_epochs", "is not a finite number"),
    "micro batch zero": (["stage.per_device_train_batch_size=0"], "stage.per_device_train_batch_size", "must be >= 1"),
    "eval micro batch zero": (["stage.per_device_eval_batch_size=0"], "stage.per_device_eval_batch_size",
                              "must be >= 1"),
    "global batch zero": (["stage.global_batch_size=0"], "stage.global_batch_size", "must be null or >= 1"),
    "warmup ratio one": (["stage.warmup_ratio=1"], "stage.warmup_ratio", "stage.warmup_ratio must be in [0, 1)"),
    "weight decay negative": (["stage.weight_decay=-0.1"], "stage.weight_decay", "must be >= 0"),
    "weight decay infinite": (["stage.weight_decay=inf"], "stage.weight_decay", "is not a finite number"),
    "max_grad_norm negative": (["stage.max_grad_norm=-1"], "stage.max_grad_norm", "0 turns clipping off"),
    "max_grad_norm nan": (["stage.max_grad_norm=nan"], "stage.max_grad_norm", "is not a finite number"),
    "logging steps zero": (["stage.logging_steps=0"], "stage.logging_steps", "must be >= 1"),
    "eval steps zero": (["stage.eval_steps=0"], "stage.eval_steps", "must be null or >= 1"),
    "save steps zero": (["stage.save_steps=0"], "stage.save_steps", "must be >= 1"),
    "save_total_limit zero": (["stage.save_total_limit=0"], "stage.save_total_limit", "null keeps every checkpoint"),
    "unknown optimizer": (["stage.optim=adamw_foo"], "stage.optim", "is not an optimizer transformers knows"),
    "optimizer needing target modules": (["stage.optim=galore_adamw"], "stage.optim", "needs optim_target_modules"),
    "optimizer of a package not installed": (["stage.optim=adamw_anyprecision"], "stage.optim",
                                             "needs the torchdistx package"),
    "unknown scheduler": (["stage.lr_scheduler_type=foo"], "stage.lr_scheduler_type",
                          "is not a scheduler transformers knows"),
    "scheduler needing its own arguments": (["stage.lr_scheduler_type=cosine_with_min_lr"],
                                            "stage.lr_scheduler_type", "needs min_lr or min_lr_rate"),
    "scheduler needing evaluation": (["stage=dpo", "stage.lr_scheduler_type=reduce_lr_on_plateau"],
                                     "stage.lr_scheduler_type", "needs evaluation during training"),
    "unknown dpo loss type": (["stage=dpo", "stage.loss_type=foo"], "stage.loss_type",
                              "is not a loss type trl.DPOTrainer takes"),
    "dpo loss type needing label smoothing": (["stage=dpo", "stage.loss_type=exo_pair"], "stage.loss_type",
                                              "needs stage.label_smoothing > 0"),
    "dpo loss type for sft": (["stage=sft", "stage.loss_type=sigmoid"], "stage.loss_type",
                              "Valid values: nll, dft"),
    "unknown attention": (["model.attn_implementation=foo"], "model.attn_implementation",
                          "is not an attention implementation transformers knows"),
    "flash attention 3 without cuda": (["model.attn_implementation=flash_attention_3", "backend.device=cpu"],
                                       "model.attn_implementation", "needs a CUDA device"),
    "unknown padding side": (["model.tokenizer.padding_side=middle"], "model.tokenizer.padding_side",
                             "Valid values: right, left"),
    "unknown model dtype": (["model.dtype=float8"], "model.dtype", "is not supported"),
    "unknown chat template": (["model.tokenizer.chat_template=llama9"], "model.tokenizer.chat_template",
                              "is not supported"),
    "unknown mixed precision": (["backend.mixed_precision=fp8"], "backend.mixed_precision", "is not supported"),
    "unknown device": (["backend.device=tpu"], "backend.device", "is not supported"),
    "unknown fsdp state dict type": (["backend=fsdp", "backend.fsdp.state_dict_type=FOO"],
                                     "backend.fsdp.state_dict_type", "SHARDED_STATE_DICT, FULL_STATE_DICT"),
    "unknown zero3 offload": (["backend=zero3", "backend.zero3.offload_param=disk"], "backend.zero3.offload_param",
                              "Valid values: none, cpu"),
    "zero3 steps_per_print zero": (["backend=zero3", "backend.zero3.steps_per_print=0"],
                                   "backend.zero3.steps_per_print", "must be >= 1"),
    "unknown tracker mode": (["tracker.mode=sometimes"], "tracker.mode", "is not supported"),
    "lora rank zero": (["peft=lora", "peft.r=0"], "peft.r", "must be >= 1"),
    "lora alpha zero": (["peft=lora", "peft.alpha=0"], "peft.alpha", "the adapter changes nothing"),
    "lora dropout above one": (["peft=lora", "peft.dropout=1.5"], "peft.dropout", "must be in [0, 1)"),
    "unknown quant type": (["peft=qlora", "peft.quant_type=int3"], "peft.quant_type", "Valid values: nf4, fp4"),
    "architecture hidden size negative": (["model.architecture.hidden_size=-5"], "model.architecture.hidden_size",
                                          "must be >= 1"),
    "architecture vocabulary zero": (["model.architecture.vocab_size=0"], "model.architecture.vocab_size",
                                     "must be >= 1"),
    "architecture rope theta negative": (["model.architecture.rope_theta=-1"], "model.architecture.rope_theta",
                                         "must be null or > 0"),
    "architecture positions zero": (["model.architecture.max_position_embeddings=0"],
                                    "model.architecture.max_position_embeddings", "must be null or >= 1"),
    "key/value heads that do not group": (["model.architecture.num_key_value_heads=3"],
                                          "model.architecture.num_key_value_heads", "does not divide"),
    "dataset rows zero": (["dataset.rows=0"], "dataset.rows", "must be null or >= 1"),
    "dataset eval rows zero": (["dataset.eval_rows=0"], "dataset.eval_rows", "must be null or >= 1"),
    "dataset test size nan": (["dataset.test_size=nan"], "dataset.test_size", "is not a finite number"),
    "dataset schema unknown": (["dataset.schema=alpaca"], "dataset.schema", "Valid values: ultrachat"),
    "bad-row policy unknown": (["dataset.bad_rows.identical=keep"], "dataset.bad_rows.identical",
                               "Valid values: fail, drop"),
    "lint policy unknown": (["dataset.lint=maybe"], "dataset.lint", "Valid values: fail, warn, off"),
    "lint rows negative": (["dataset.lint_rows=-1"], "dataset.lint_rows", "must be >= 0"),
    "data processes zero": (["dataset.num_proc=0"], "dataset.num_proc", "must be null or >= 1"),
    "hub dataset offline": (["stage=dpo", "dataset=ultrafeedback_binarized", "offline=true"], "dataset",
                            "--local-dir data/ultrafeedback_binarized"),
    "lora target absent": (["peft=lora", "peft.target_modules=[q_proj,attn_out]"], "peft.target_modules",
                           "names attn_out, which tiny_qwen2 (qwen2) does not have. Its linear layers are: "
                           "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    "separate reference without path": (["stage=dpo", "ref=separate"], "ref.path", "ref=separate needs ref.path"),
    "unknown reference option": (["stage=dpo", "ref.name=mirror"], "ref", "ref=mirror is not supported"),
    "adapter_copy without an adapter parent": (["stage=dpo", "peft=lora", "ref=adapter_copy"], "ref",
                                               "ref=adapter_copy needs a policy that starts from a parent"),
    "base reference with full fine-tuning": (["stage=dpo", "ref=base"], "ref", "ref=base disables the LoRA adapter"),
    "unknown parent_adapter": (["stage=dpo", "parent_adapter=fold"], "parent_adapter", "Valid values: auto, keep"),
    "architecture facts missing": (["model=mistral7b", "model.architecture.hidden_size=???",
                                    "model.architecture.vocab_size=???", "dry_run=true"], "model",
                                   "model mistral7b is missing architecture facts: hidden_size, vocab_size"),
    "unknown model type": (["model.architecture.model_type=gpt9"], "model.architecture.model_type",
                           "model_type=gpt9 is not a model type"),
    "bad sweep member": (["--multirun", "stage=dpo", "beta=0.1,-1"], "beta", "sweep member [beta=-1]: stage.beta must be > 0"),
    "global batch does not divide": (["stage=dpo", "backend=ddp", "launcher.num_processes=3"],
                                     "stage.global_batch_size",
                                     "stage.global_batch_size=32 does not split into micro batches of 8 "
                                     "(stage.per_device_train_batch_size) on 3 processes: 32 is not a multiple of "
                                     "8 × 3 = 24. Nearest valid settings: stage.global_batch_size=24, "
                                     "stage.global_batch_size=48, launcher.num_processes=2, launcher.num_processes=4"),
    "micro batch does not divide": (["stage=sft", "backend=fsdp", "launcher.num_processes=2",
                                     "stage.per_device_train_batch_size=6"], "stage.per_device_train_batch_size",
                                    "Nearest valid settings: stage.global_batch_size=504, "
                                    "stage.global_batch_size=516, stage.per_device_train_batch_size=4, "
                                    "stage.per_device_train_batch_size=8"),
    "single backend with several processes": (["backend=single", "launcher.num_processes=2"],
                                              "launcher.num_processes", "backend=single runs one process"),
    "processes not a multiple of machines": (["backend=ddp", "launcher.num_processes=3", "launcher.num_machines=2"],
                                             "launcher.num_machines", "does not spread evenly over"),
    "machines zero": (["launcher.num_machines=0"], "launcher.num_machines", "must be >= 1"),
    "machine rank beyond the machines": (["launcher.machine_rank=5"], "launcher.machine_rank",
                                         "must be below launcher.num_machines=1"),
    "port out of range": (["launcher.main_process_port=70000"], "launcher.main_process_port",
                          "must be null or in [1, 65535]"),
    "gpu memory infinite": (["launcher.gpu_memory_gb=inf"], "launcher.gpu_memory_gb", "is not a finite number"),
    "fsdp wrap class not in the model": (["backend=fsdp", "backend.fsdp.wrap_class=LlamaDecoderLayer"],
                                         "backend.fsdp.wrap_class",
                                         "backend.fsdp.wrap_class=LlamaDecoderLayer is not a module class of "
                                         "tiny_qwen2 (qwen2). Its layer classes: Qwen2DecoderLayer"),
    "backend name without its settings": (["backend.name=zero3"], "backend.name",
                                          "choose the config group instead, `backend=zero3`"),
    "backend device cuda without CUDA": (["backend.device=cuda"], "backend.device",
                                         "backend.device=cuda but no CUDA device is visible"),
    "diagnostics window zero": (["diagnostics.window=0"], "diagnostics.window", "must be >= 1"),
    "diagnostics ceiling nan": (["diagnostics.grad_norm_high=nan"], "diagnostics.grad_norm_high",
                                "is not a finite number"),
    "diagnostics accuracy band too wide": (["diagnostics.accuracy_band=0.7"], "diagnostics.accuracy_band",
                                           "must be in [0, 0.5]"),
    "eval without a model to evaluate": (["stage=eval"], "parent_run",
                                         "neither parent_run nor model.name_or_path is set"),
    "eval batch zero": (["eval.batch_size=0"], "eval.batch_size", "must be >= 1"),
    "eval pairs zero": (["stage=eval", "eval.max_pairs=0"], "eval.max_pairs", "must be null or >= 1"),
    "eval top_p zero": (["eval.generation.top_p=0"], "eval.generation.top_p", "must be in (0, 1]"),
    "eval new tokens zero": (["eval.generation.max_new_tokens=0"], "eval.generation.max_new_tokens", "must be >= 1"),
    "eval temperature negative": (["stage=eval", "eval.generation.temperature=-1"], "eval.generation.temperature",
                                  "must be >= 0"),
    "judge timeout nan": (["eval.judge.timeout_s=nan"], "eval.judge.timeout_s", "is not a finite number"),
    "unknown judge": (["stage=eval", "eval.judge.name=oracle"], "eval.judge.name", "is not supported"),
    "http judge without url": (["stage=eval", "judge=http", "eval.judge.model=m"], "eval.judge.url",
                               "judge=http needs eval.judge.url, the base URL of an OpenAI-compatible API (e.g. "
                               "http://localhost:8000/v1)."),
    "http judge url not http": (["stage=eval", "judge=http", "eval.judge.url=localhost:8000", "eval.judge.model=m"],
                                "eval.judge.url",
                                "judge=http needs eval.judge.url, the base URL of an OpenAI-compatible API"),
    "unknown judge rule": (["stage=eval", "judge=rule", "eval.judge.rule=length"], "eval.judge.rule",
                           "eval.judge.rule=length is neither a built-in rule (arithmetic) nor `package.module:function`"),
    "unloadable judge rule": (["stage=eval", "judge=rule", "eval.judge.rule=nowhere.rules:score"], "eval.judge.rule",
                              "eval.judge.rule=nowhere.rules:score cannot be loaded"),
    "prompts file missing": (["stage=eval", "eval.generation.prompts=prompts.jsonl"], "eval.generation.prompts",
                             "eval.generation.prompts=prompts.jsonl is not a file"),
    "eval on several processes": (["stage=eval", "backend=ddp"], "backend", "stage=eval runs in one process"),
    "eval parent missing": (["stage=eval", "parent_run=outputs/nowhere"], "parent_run",
                            "parent_run=outputs/nowhere does not exist"),
    "judge checked before training": (["stage=dpo", "eval.after_training=true", "judge=rule",
                                       "eval.judge.rule=length"], "eval.judge.rule", "eval.judge.rule=length is neither"),
    "one data file but an eval split named": ([f"dataset.path={FIXTURE_SFT / 'train_sft.jsonl'}", "stage=sft"],
                                              "dataset.eval_split",
                                              "holds one split (used as dataset.train_split=train_sft), but "
                                              "dataset.eval_split=test_sft is also named"),
    "named split absent from a data dir": ([f"dataset.path={FIXTURE_SFT}", "stage=sft", "dataset.eval_split=dev"],
                                           "eval_split", "split 'dev' not found in"),
    "data file of another schema": ([f"dataset.path={FIXTURE_SFT}", "stage=dpo", "dataset.schema=ultrafeedback",
                                     "dataset.train_split=train_sft", "dataset.eval_split=test_sft"],
                                    "schema", "row 0 ("),
    "run_dir is a file": ([f"run_dir={REPO / 'README.md'}"], "run_dir", "is a file, not a directory"),
    "run_dir under a file": ([f"run_dir={REPO / 'README.md' / 'run'}"], "run_dir",
                             "cannot be created: " + str(REPO / "README.md") + " is a file"),
    "rerun of a missing run dir": (["rerun=outputs/nowhere"], "rerun", "rerun="),
}


def _as_tested(args: list[str], run_dir) -> list[str]:
    """The case's overrides as the tests run them: with run_dir=<a dir that must not appear> (unless the case is
    about run_dir itself), and with stage=sft where no stage is named: the default command is the demo chain, which
    composes and checks each link again (three times the time) for the same refusal."""
    if any(a.startswith("rerun=") for a in args):
        return list(args)
    tested = list(args) if any(a.startswith("stage=") for a in args) else [*args, "stage=sft"]
    if any(a.startswith(("run_dir=", "--multirun")) for a in args):
        return tested
    return [*tested, f"run_dir={run_dir}"]


def _refusal(args: list[str]) -> str | None:
    """What the command's up-front checks say about a command line, in this process (no CLI start-up)."""
    from alignment.preflight.command_line import normalise
    from alignment.preflight.compose import preflight
    from alignment.errors import ConfigError

    try:
        preflight(normalise(list(args)))
    except ConfigError as err:
        return str(err)
    return None


def test_the_table_is_large_and_every_case_names_its_key():
    assert len(CASES) >= 80
    assert all(key and message for _, key, message in CASES.values())


@pytest.mark.parametrize("args, key, message", CASES.values(), ids=CASES.keys())
def test_every_refusal_is_the_same_for_the_run_and_its_dry_run(tmp_path, monkeypatch, args, key, message):
    """The fast tier's form of the CLI table below, in this process: one line naming the key, nothing written, and
    validation of the run and of its dry run compared on the same composed config (composing twice is what the
    CLI form does; here it would only double the time)."""
    import dataclasses

    from alignment.preflight import compose
    from alignment.errors import ConfigError
    from alignment.config.schema import freeze

    validate = compose.validate

    def run_and_dry_run(cfg, previous=None):
        answers = []
        for dry_run in (False, True):
            try:
                validate(freeze(dataclasses.replace(cfg, dry_run=dry_run)), previous=previous)
                answers.append(None)
            except ConfigError as err:
                answers.append(str(err))
        assert answers[0] == answers[1], answers
        if answers[0] is not None:
            raise ConfigError(answers[0])

    monkeypatch.setattr(compose, "validate", run_and_dry_run)
    monkeypatch.chdir(tmp_path)
    run_args = [a for a in args if a != "dry_run=true"]
    refusal = _refusal(_as_tested(run_args, tmp_path / "x"))
    assert refusal is not None and message.lower() in refusal.lower(), refusal
    assert key in refusal and "\n" not in refusal, refusal
    assert not (tmp_path / "x").exists() and not (tmp_path / "outputs").exists(), "nothing may be written"


@pytest.mark.slow
@pytest.mark.parametrize("args, key, message", CASES.values(), ids=CASES.keys())
def test_bad_input_exits_2_with_a_clear_message_and_its_dry_run_identically(tmp_path, args, key, message):
    """Every refusal, asked of the run and of its dry run through the CLI: exit 2, exactly one `alignment: error:`
    line naming the key, no traceback, nothing written (so no weights were loaded). The plan of a run that would be
    refused is worth nothing, so the dry run is refused with the same line."""
    from concurrent.futures import ThreadPoolExecutor

    run_args = _as_tested([a for a in args if a != "dry_run=true"], tmp_path / "x")
    with ThreadPoolExecutor(2) as pool:  # the two commands at once: the table is long, and each is mostly start-up
        run, dry = pool.map(lambda extra: run_cli(*run_args, *extra, cwd=tmp_path), ([], ["dry_run=true"]))
    for result in (run, dry):
        assert result.returncode == 2, (result.args, result.stdout[-2000:], result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("alignment: error:")]
        assert len(errors) == 1 and result.stderr.count("alignment: error:") == 1, result.stderr[-2000:]
        assert message.lower() in errors[0].lower() and key in errors[0], errors[0]
        assert "Traceback" not in result.stderr + result.stdout
    errors = [[line for line in r.stderr.splitlines() if line.startswith("alignment: error:")] for r in (run, dry)]
    assert errors[0] == errors[1]
    assert not (tmp_path / "x").exists() and not (tmp_path / "outputs").exists(), "nothing may be written"


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


def test_every_numeric_setting_has_a_range():
    """Every int and float field of the RunConfig tree (engine settings and mix sources included) is checked for
    finiteness by walking the dataclasses; each must also have a range in NUMBER_RANGES, so a new field is not left
    with finiteness alone."""
    import dataclasses
    import typing

    from alignment.config.schema import RunConfig
    from alignment.preflight.ranges import _number_fields, range_of

    missing, seen = [], set()

    def visit(cls: type, prefix: str) -> None:
        if cls in seen:
            return
        seen.add(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in _number_fields(cls):
                if range_of(cls, f.name) is None:
                    missing.append(f"{prefix}{f.name}")
                continue
            for arg in (hints[f.name], *typing.get_args(hints[f.name]), *[a for t in typing.get_args(hints[f.name])
                                                                          for a in typing.get_args(t)]):
                if dataclasses.is_dataclass(arg):
                    visit(arg, f"{prefix}{f.name}.")

    visit(RunConfig, "")
    assert not missing, f"add a Range to alignment.preflight.ranges.NUMBER_RANGES for: {', '.join(missing)}"
    assert len(seen) >= 15  # the walk reached the nested settings (stage, eval.generation, backend.zero3, ...)


def test_max_grad_norm_zero_turns_clipping_off_and_is_accepted(tmp_path, monkeypatch):
    """transformers clips only when max_grad_norm > 0: 0 is the documented way to turn clipping off."""
    monkeypatch.chdir(tmp_path)
    assert _refusal(["stage=sft", "stage.max_grad_norm=0"]) is None
    assert "0 turns clipping off" in _refusal(["stage=sft", "stage.max_grad_norm=-0.5"])


def test_library_lists_read_from_source_are_the_libraries_own():
    """The valid values are read from the installed libraries' source files (fast, nothing heavy imported); they must
    be exactly what the imported objects say."""
    from transformers.modeling_utils import AttentionInterface
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames
    from trl import DPOConfig, SFTConfig

    from alignment.preflight import library_choices

    assert library_choices.optimizer_names() == tuple(o.value for o in OptimizerNames)
    assert library_choices.scheduler_names() == tuple(s.value for s in SchedulerType)
    assert set(library_choices.attention_names()) == {"eager", *AttentionInterface._global_mapping}
    from trl import KTOConfig
    from trl.experimental.cpo import CPOConfig

    from alignment.config.registry import stage_named

    def read(name):
        return library_choices.loss_types(stage_named(name).loss_types_from)

    assert read("sft") == tuple(SFTConfig.__dataclass_fields__["loss_type"].metadata["choices"])
    assert read("kto") == tuple(KTOConfig.__dataclass_fields__["loss_type"].metadata["choices"])
    assert read("cpo") == tuple(CPOConfig.__dataclass_fields__["loss_type"].metadata["choices"])
    dpo = read("dpo")
    assert {"sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down"} <= set(dpo)
    assert DPOConfig.__dataclass_fields__["loss_type"].default_factory() == ["sigmoid"]


def test_optimizer_checks_agree_with_what_transformers_builds(tmp_path):
    """For every optimizer name: accepted by validation exactly when transformers can build it here with the settings
    a run passes (no optim_target_modules), and refused with the reason otherwise."""
    import torch
    from transformers import Trainer, TrainingArguments

    from alignment.errors import ConfigError
    from alignment.preflight.library_choices import _check_optimizer, optimizer_names

    model = torch.nn.Linear(4, 4)
    disagree = []
    for name in optimizer_names():
        try:
            _check_optimizer(name)
            accepted = True
        except ConfigError:
            accepted = False
        try:
            args = TrainingArguments(output_dir=str(tmp_path), optim=name, use_cpu=True, report_to=[])
            Trainer.get_optimizer_cls_and_kwargs(args, model)
            builds = True
        except (ImportError, ValueError):
            builds = False
        if accepted != builds:
            disagree.append((name, accepted, builds))
    assert not disagree, disagree


def test_scheduler_lists_agree_with_transformers(tmp_path):
    """The schedulers refused for needing lr_scheduler_kwargs are those transformers cannot build without them; those
    refused without evaluation are those TrainingArguments refuses without an eval strategy."""
    import torch
    from transformers import TrainingArguments, get_scheduler

    from alignment.preflight.library_choices import SCHEDULERS_NEEDING_EVAL, SCHEDULERS_NEEDING_KWARGS, scheduler_names

    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    needs_kwargs, needs_eval = set(), set()
    for name in scheduler_names():
        try:
            get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=10)
        except (TypeError, ValueError):
            needs_kwargs.add(name)
        try:
            TrainingArguments(output_dir=str(tmp_path), lr_scheduler_type=name, eval_strategy="no", use_cpu=True,
                              report_to=[])
        except ValueError:
            needs_eval.add(name)
    assert needs_kwargs == set(SCHEDULERS_NEEDING_KWARGS)
    assert needs_eval == set(SCHEDULERS_NEEDING_EVAL)


def _validate(*overrides: str):
    from alignment.preflight.compose import compose_run_config
    from alignment.preflight.validation import validate

    validate(compose_run_config(["stage=sft", *overrides]))


def test_run_dir_checks_create_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _validate(f"run_dir={tmp_path / 'a' / 'b' / 'c'}")
    _validate()  # run_dir unset: outputs/ under the working dir
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 dir, so it cannot be made unwritable")
def test_run_dir_in_an_unwritable_dir_is_refused(tmp_path, monkeypatch):
    from alignment.errors import ConfigError

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(ConfigError, match=f"run_dir={locked / 'run'} cannot be written: {locked} is not writable"):
            _validate(f"run_dir={locked / 'run'}")
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_run_dir_on_a_read_only_filesystem_is_refused(tmp_path, monkeypatch):
    """A read-only mount (simulated: statvfs reports ST_RDONLY, as it does for a `mount -o ro` filesystem)."""
    from alignment.preflight import run_location
    from alignment.errors import ConfigError

    real = os.statvfs

    class ReadOnly:
        def __init__(self, path):
            self._stat = real(path)
            self.f_flag = self._stat.f_flag | os.ST_RDONLY

    monkeypatch.setattr(run_location.os, "statvfs", ReadOnly)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"run_dir={tmp_path / 'run'} is on a read-only filesystem"):
        _validate(f"run_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match="run_dir \\(unset: a new dir under .*outputs\\) is on a read-only"):
        _validate()


def test_run_dir_without_room_for_the_run_is_refused_with_both_numbers(tmp_path, monkeypatch):
    """Free space below what the run writes at least (the trained weights, a checkpoint of them, its records) is
    refused with both numbers; a dry run, often planned on another machine, is not refused for it."""
    import shutil

    from alignment.preflight import run_location
    from alignment.errors import ConfigError

    free = {"bytes": 10 * 10**9}
    monkeypatch.setenv("ALIGNMENT_MEMORY_CAPACITY_GB", "10000")  # the 7B twin fits memory: this test is about disk
    monkeypatch.setattr(run_location.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free["bytes"], free["bytes"]))
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    _validate(f"run_dir={run_dir}")  # the tiny twin writes a few MB
    args = ["model=mistral7b", "model.name_or_path=null", "model.tiny=true", f"run_dir={run_dir}"]
    with pytest.raises(ConfigError) as refused:
        _validate(*args, "model.dtype=bfloat16")
    message = str(refused.value)
    assert f"run_dir={run_dir} has 10.0 GB free on its filesystem" in message
    # Mistral-7B has 7.24B parameters; the floor counts 5.2B (an ungated MLP, one embedding matrix): conservative.
    assert "but this run writes at least 21.0 GB" in message and "at least 5.2B parameters at 2 bytes" in message
    assert "checkpoint" in message and "Free space, or choose a run_dir on a larger filesystem" in message
    _validate(*args, "model.dtype=bfloat16", "peft=lora")  # an adapter is small
    _validate(*args, "model.dtype=bfloat16", "dry_run=true")
    free["bytes"] = 10**6
    with pytest.raises(ConfigError, match="has 1.0 MB free .* at least 33.6 MB: its records"):
        _validate(f"run_dir={run_dir}", "peft=lora")
    assert not run_dir.exists()
