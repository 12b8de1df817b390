"""Checks a RunConfig before anything heavy runs; each failure names the key and what to do."""

from __future__ import annotations

import os
from pathlib import Path

from alignment.launch.backends import check_engine_installed, check_wrap_class
from alignment.config.schema import RunConfig
from alignment.preflight.batching import check_batching
from alignment.errors import one_of, require
from alignment.preflight.library_choices import check_training_choices
from alignment.preflight.ranges import check_numbers
from alignment.preflight.run_location import check_run_location
from alignment.data import SCHEMAS, check_sources, source_key
from alignment.data.loading import settings_error
from alignment.data.schemas import PROBLEM_KINDS
from alignment.evaluation.harness import check_harness
from alignment.evaluation.judges import check_judge
from alignment.plan.processes import is_secondary_machine, resolve_launcher, visible_gpus
from alignment.models.modeling import check_model_source, check_target_modules, uses_cuda
from alignment.runtime.optional import require_importable
from alignment.runtime.ranks import launched_run_dir
from alignment.plan.resolved import resolve_plan
from alignment.plan.checkpointing import check_setting as check_checkpointing_setting
from alignment.plan.gate import GATE_SETTINGS, enforce as enforce_memory_gate
from alignment.records.rundir import RunDir, check_run_dir, has_model
from alignment.preflight.secret_settings import check_secret_settings, read_secret_env
from alignment.secrets import is_local_url
from alignment.config.registry import stage_of
from alignment.models.start import is_adapter_dir, parent_is_adapter
from alignment.config.offline import is_offline

_DTYPES = ("float32", "bfloat16", "float16", "auto")
_PRECISIONS = ("auto", "no", "bf16", "fp16")
_DEVICES = ("auto", "cpu", "cuda")
_BACKENDS = ("single", "ddp", "fsdp", "zero3")
_PEFT_METHODS = ("none", "lora", "qlora")
_QUANT_TYPES = ("nf4", "fp4")


def validate(cfg: RunConfig, previous: RunConfig | None = None) -> None:
    """Raise ConfigError on the first problem. Filesystem checks are cheap; nothing is loaded.

    A dry run is checked exactly as the run it describes (tests/test_bad_input.py runs the whole table both ways):
    a plan that the run would then refuse is worth nothing. The exceptions are facts of the machine the run will use
    rather than of its configuration: the free space of the run dir's filesystem (check_run_location) and the memory
    free on its devices (the memory gate, alignment/plan/gate.py: a dry run shows its verdict against
    launcher.gpu_memory_gb instead).

    previous: the chain link before this one, whose run dir (this link's parent) does not exist yet.
    """
    check_secret_settings(cfg)  # *_env settings name a variable, never hold a key; no secret in a run's name
    stage, described = cfg.stage, stage_of(cfg)
    require(not described.trains or cfg.learning_rate is not None,
             f"learning_rate is mandatory for stage={stage.name} and has no value. Set it, e.g. learning_rate=5e-7.")
    check_numbers(cfg)  # every int and float setting: finite, and inside its range (NUMBER_RANGES)
    budget = getattr(stage, "max_prompt_length", None)
    require(budget is None or 1 <= budget < stage.max_length,
             f"stage.max_prompt_length must be null or in [1, stage.max_length) (got {budget} with "
             f"max_length {stage.max_length}): a prompt must leave room for the response.")
    _check_positions(cfg)
    check_training_choices(cfg)
    _check_dataset(cfg)
    _check_eval(cfg)

    _check_model_type(cfg)
    one_of("model.dtype", cfg.model.dtype, _DTYPES)
    check_checkpointing_setting(cfg.model.gradient_checkpointing)  # true | false | auto
    check_batching(cfg)  # stage.batching, stage.padding_free, stage.use_liger_kernel (preflight/batching.py)
    one_of("backend.name", cfg.backend.name, _BACKENDS)
    one_of("backend.device", cfg.backend.device, _DEVICES)
    one_of("backend.mixed_precision", cfg.backend.mixed_precision, _PRECISIONS)
    one_of("peft.method", cfg.peft.method, _PEFT_METHODS)
    one_of("tracker.name", cfg.tracker.name, ("none", "wandb", "tensorboard"))
    one_of("tracker.mode", cfg.tracker.mode, ("auto", "offline", "online", "disabled"))
    require(cfg.peft.method == "none" or cfg.peft.r >= 1, f"peft.r must be >= 1 (got {cfg.peft.r}).")
    if cfg.peft.method == "qlora":
        _check_qlora(cfg)
    check_target_modules(cfg)
    _check_launcher(cfg)
    _check_backend(cfg)
    _check_devices(cfg)

    if cfg.parent_run and previous is None:
        _check_parent(Path(cfg.parent_run))
    _check_start_and_reference(cfg, previous)
    if not cfg.parent_run:
        check_model_source(cfg.model, is_offline(cfg))
    if described.reference and cfg.ref.name == "separate":
        check_model_source(cfg.model, is_offline(cfg), path=cfg.ref.path, key="ref.path")
    check_sources(cfg.dataset, is_offline(cfg))
    # The decisions (batch split, reference, precision, checkpointing, ...), made once here and reused downstream: a
    # choice that cannot be made (a global batch that does not split, a reference option that cannot apply) is refused.
    plan = resolve_plan(cfg, previous)
    # The memory gate, before the run dir's free-space check: a run too large for its devices would otherwise be told
    # to find room for weights that the run that fits (LoRA, QLoRA) never writes. A launched rank's devices were
    # measured by its launching process; a dry run or data report only shows the verdict.
    if launched_run_dir() is None and not (cfg.dry_run or cfg.data_report):
        enforce_memory_gate(cfg, plan.memory_gate)
    # A launched rank's dir was checked by its parent, a secondary machine's by machine 0.
    if launched_run_dir() is None and not is_secondary_machine(cfg):
        check_run_location(cfg)  # a file, an unwritable or read-only place, too little space: refused unwritten
        if cfg.run_dir is not None:
            check_run_dir(Path(cfg.run_dir), cfg.resume)


def _check_dataset(cfg: RunConfig) -> None:
    """Schemas agree with the stage and policies are spelled right; paths are checked later by check_sources."""
    wanted = stage_of(cfg).data_format
    dataset = cfg.dataset
    for index, source in enumerate(dataset.sources):
        key = source_key(index)
        error = settings_error(source, key)
        require(error is None, error or "")
        fmt = SCHEMAS[source.schema].format
        # stage=eval without the preference accuracy only draws prompts: chat data serves as well.
        require(fmt == wanted or (not stage_of(cfg).trains and not cfg.eval.preference),
                 f"stage={cfg.stage.name} {'evaluates' if not stage_of(cfg).trains else 'trains'} on {wanted} data, "
                 f"but {key} ({source.name}) has schema "
                 f"{source.schema}, which holds {fmt} data. Pick a matching dataset, e.g. "
                 f"{'dataset=ultrachat_200k' if wanted == 'chat' else 'dataset=ultrafeedback_binarized'} "
                 f"(or dataset=tiny_{cfg.stage.name} offline).")
    for problem in PROBLEM_KINDS:
        one_of(f"dataset.bad_rows.{problem}", getattr(dataset.bad_rows, problem), ("fail", "drop"))
    one_of("dataset.lint", dataset.lint, ("fail", "warn", "off"))
    require(dataset.lint_rows >= 0, f"dataset.lint_rows must be >= 0 (got {dataset.lint_rows}).")
    require(dataset.num_proc is None or dataset.num_proc >= 1,
             f"dataset.num_proc must be null or >= 1 (got {dataset.num_proc}).")


def _check_eval(cfg: RunConfig) -> None:
    """Evaluation settings, the judge and the prompts file: refused before any training starts."""
    settings = cfg.eval
    if stage_of(cfg).trains and not settings.after_training:
        return
    generation = settings.generation
    require(settings.batch_size >= 1, f"eval.batch_size must be >= 1 (got {settings.batch_size}).")
    require(settings.max_pairs is None or settings.max_pairs >= 1,
             f"eval.max_pairs must be null or >= 1 (got {settings.max_pairs}).")
    require(generation.num_prompts >= 0, f"eval.generation.num_prompts must be >= 0 (got {generation.num_prompts}).")
    require(generation.samples_per_prompt >= 1,
             f"eval.generation.samples_per_prompt must be >= 1 (got {generation.samples_per_prompt}).")
    require(generation.max_new_tokens >= 1,
             f"eval.generation.max_new_tokens must be >= 1 (got {generation.max_new_tokens}).")
    require(generation.batch_size >= 1, f"eval.generation.batch_size must be >= 1 (got {generation.batch_size}).")
    require(not generation.do_sample or generation.temperature > 0,
             f"eval.generation.temperature must be > 0 when sampling (got {generation.temperature}); use "
             f"eval.generation.do_sample=false for greedy answers.")
    require(0 < generation.top_p <= 1, f"eval.generation.top_p must be in (0, 1] (got {generation.top_p}).")
    require(generation.prompts is None or Path(generation.prompts).is_file(),
             f"eval.generation.prompts={generation.prompts} is not a file. Give a .jsonl or .txt file of prompts, "
             f"or null to use the eval split's prompts.")
    check_judge(settings.judge)
    if settings.judge.name == "http" and settings.judge.api_key_env and not is_local_url(settings.judge.url):
        read_secret_env("eval.judge.api_key_env", settings.judge.api_key_env,  # a remote API needs its key
                        "or eval.judge.api_key_env=null for a server that takes none")
    check_harness(settings)
    if settings.reference:
        reference = Path(settings.reference)
        require(reference.exists() or not settings.reference.startswith(("/", ".", "~")),
                 f"eval.reference={settings.reference} does not exist. Give a run dir, a model or adapter dir, or a "
                 f"hub id, or null for the evaluated run's own reference.")
    if not stage_of(cfg).trains:
        require(cfg.backend.name == "single",
                 f"stage=eval runs in one process, but backend={cfg.backend.name}. Use backend=single (the default).")
        _check_evaluated_model(cfg)


def _check_evaluated_model(cfg: RunConfig) -> None:
    """stage=eval loads the parent's model with this run's model settings (chat template, pad token, dtype)."""
    require(bool(cfg.parent_run or cfg.model.name_or_path),
             f"stage=eval evaluates a trained model, but neither parent_run nor model.name_or_path is set: it would "
             f"evaluate an untrained {cfg.model.name} twin against itself. Add parent_run=<a finished run dir> (e.g. "
             f"outputs/<date>/<time>_demo-tiny_qwen2/2-dpo) or model.name_or_path=<a checkpoint>.")
    parent_config = Path(cfg.parent_run or "") / "config.yaml"
    if not cfg.parent_run or not parent_config.exists():
        return  # no parent, or a missing one (refused by _check_parent)
    import yaml

    trained = (yaml.safe_load(parent_config.read_text()) or {}).get("model", {}).get("name")
    require(trained in (None, cfg.model.name),
             f"parent_run={cfg.parent_run} was trained with model={trained}, but this evaluation composes "
             f"model={cfg.model.name}, whose tokenizer settings (chat template, pad token) would be applied to it. "
             f"Add model={trained}.")


def _check_qlora(cfg: RunConfig) -> None:
    peft = cfg.peft
    one_of("peft.quant_type", peft.quant_type, _QUANT_TYPES)
    one_of("peft.compute_dtype", peft.compute_dtype, ("bfloat16", "float16", "float32"))
    one_of("peft.quant_storage", peft.quant_storage, ("bfloat16", "float16", "float32", "uint8"))
    require_importable("bitsandbytes", "peft=qlora needs bitsandbytes with 4-bit support on this machine",
                       "Install it (`pip install bitsandbytes`; CUDA, or its CPU backend), or use peft=lora.")


def _check_devices(cfg: RunConfig) -> None:
    import torch

    cuda = uses_cuda(cfg)
    require(cfg.backend.device != "cuda" or torch.cuda.is_available(),
             "backend.device=cuda but no CUDA device is visible. Use backend.device=auto or cpu.")
    require(cuda or cfg.backend.mixed_precision in ("auto", "no"),
             f"backend.mixed_precision={cfg.backend.mixed_precision} needs a CUDA device; on CPU use "
             f"backend.mixed_precision=no (or auto).")
    launcher = resolve_launcher(cfg).launcher
    per_machine, gpus = launcher.num_processes // launcher.num_machines, visible_gpus()
    require(not cuda or per_machine <= gpus,
             f"launcher.num_processes={launcher.num_processes} on {launcher.num_machines} machine(s) needs "
             f"{per_machine} GPUs per machine, but this machine shows {gpus} (CUDA_VISIBLE_DEVICES="
             f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Use launcher.num_processes={gpus * launcher.num_machines}, "
             f"or leave it null to use every visible GPU.")
    check_engine_installed(cfg)
    _check_tracker_installed(cfg)


def _check_tracker_installed(cfg: RunConfig) -> None:
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(cfg.tracker.name)
    if package is None:
        return
    require_importable(package, f"tracker={cfg.tracker.name} needs the {package} package",
                       f"Install it (`pip install {package}`) or use tracker=none (metrics.jsonl and plots/ are "
                       f"always written).")


def _check_backend(cfg: RunConfig) -> None:
    """Engine settings present for the chosen backend, FSDP's wrap class in the model, the batch splitting evenly."""
    backend = cfg.backend
    for name in ("fsdp", "zero3"):
        require(backend.name != name or getattr(backend, name) is not None,
                 f"backend.name={name} has no backend.{name} settings: choose the config group instead, "
                 f"`backend={name}`, which brings them (alignment/conf/backend/{name}.yaml).")
    if backend.name == "fsdp":
        check_wrap_class(cfg)


def _check_parent(parent: Path) -> None:
    require(parent.is_dir(), f"parent_run={parent} does not exist. Point it at a finished SFT run dir.")
    require(has_model(parent), f"parent_run={parent} is not a finished run (summary.json status is not "
                                  f"'finished'). Finish or resume it first.")
    model = RunDir(parent).model
    require((model / "config.json").exists() or is_adapter_dir(model),
             f"parent_run={parent} has no saved model in {model} (neither config.json nor adapter_config.json). "
             f"Point parent_run at a run that finished training and saved its model.")


def _check_start_and_reference(cfg: RunConfig, previous: RunConfig | None) -> None:
    one_of("parent_adapter", cfg.parent_adapter, ("auto", "keep", "merge"))
    from_adapter = parent_is_adapter(cfg, previous)
    require(not (from_adapter and cfg.parent_adapter == "keep" and cfg.peft.method == "none"),
             "parent_adapter=keep trains the parent's LoRA adapter further, which needs peft=lora or peft=qlora. "
             "Use parent_adapter=merge (or auto) to fold it into its base and train every weight.")


def _check_model_type(cfg: RunConfig) -> None:
    from transformers import CONFIG_MAPPING

    model_type = cfg.model.architecture.model_type
    require(model_type in CONFIG_MAPPING,
             f"model.architecture.model_type={model_type} is not a model type transformers knows (e.g. qwen2, "
             f"mistral, llama). Copy model_type from the checkpoint's config.json.")
    template = cfg.model.tokenizer.chat_template
    require(template in (None, "chatml", "zephyr"), f"model.tokenizer.chat_template={template} is not supported. "
             f"Valid values: chatml, zephyr, or null for the tokenizer's own template.")


def _check_launcher(cfg: RunConfig) -> None:
    launcher = cfg.launcher
    require(launcher.num_machines >= 1, f"launcher.num_machines must be >= 1 (got {launcher.num_machines}).")
    require(launcher.gpu_memory_gb > 0, f"launcher.gpu_memory_gb must be > 0 (got {launcher.gpu_memory_gb}).")
    one_of("launcher.memory_gate", launcher.memory_gate, GATE_SETTINGS)
    require(launcher.machine_rank is None or launcher.machine_rank < launcher.num_machines,
             f"launcher.machine_rank={launcher.machine_rank} must be below launcher.num_machines="
             f"{launcher.num_machines} (machines are numbered from 0).")
    processes = launcher.num_processes
    if processes is None:
        return  # filled from the visible devices (alignment/launch/launcher.py)
    require(processes >= 1, f"launcher.num_processes must be >= 1 or null (got {processes}).")
    require(processes % launcher.num_machines == 0,
             f"launcher.num_processes={processes} does not spread evenly over launcher.num_machines="
             f"{launcher.num_machines}: give the total over all machines, a multiple of the machine count.")
    require(cfg.backend.name != "single" or (processes == 1 and launcher.num_machines == 1),
             f"backend=single runs one process, but launcher.num_processes={processes} and launcher.num_machines="
             f"{launcher.num_machines}. Choose backend=ddp (whole model per process), backend=fsdp or backend=zero3 "
             f"(sharded) for several processes.")


def _check_positions(cfg: RunConfig) -> None:
    """Sequences no longer than the positions the model was built for; GQA heads that group evenly."""
    arch, stage = cfg.model.architecture, cfg.stage
    positions = arch.max_position_embeddings
    require(positions is None or stage.max_length <= positions,
             f"stage.max_length={stage.max_length} is beyond the {positions} positions of model {cfg.model.name} "
             f"(model.architecture.max_position_embeddings={positions}): tokens past position {positions} have no "
             f"trained position encoding. Use stage.max_length={positions} or less.")
    require(arch.num_attention_heads % arch.num_key_value_heads == 0,
             f"model.architecture.num_key_value_heads={arch.num_key_value_heads} does not divide "
             f"model.architecture.num_attention_heads={arch.num_attention_heads}: each key/value head serves a whole "
             f"group of query heads.")
