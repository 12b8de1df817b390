"""The typed run object.

Hydra composes YAML from `alignment/conf/` onto these dataclasses (registered in the ConfigStore as `run_schema`,
the first entry of the root defaults list), so a typo in a key or a wrong type fails at composition.
`to_run_config` turns the composed DictConfig into one frozen `RunConfig` that every module receives;
`validate` checks what types cannot (ranges, stage/data agreement, paths) before anything heavy runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import MISSING

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # alignment/, where conf/ and fixtures/ ship
FIXTURES_DIR = PACKAGE_DIR / "fixtures"


class _Frozen:
    """Mutable while OmegaConf builds the object, read-only once `freeze` has run.

    Hydra cannot merge into `dataclass(frozen=True)` schemas, so immutability is added after conversion.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise dataclasses.FrozenInstanceError(f"RunConfig is read-only: cannot set {name!r}")
        object.__setattr__(self, name, value)


def freeze(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, list):
                object.__setattr__(obj, f.name, tuple(freeze(v) for v in value))
            else:
                freeze(value)
        object.__setattr__(obj, "_frozen", True)
    elif isinstance(obj, list):
        return tuple(freeze(v) for v in obj)
    return obj


@dataclass
class ArchitectureConfig(_Frozen):
    """What dry runs, the planner, LoRA checks and FSDP wrapping need to know about a model without loading it.

    For a checkpoint these are read from its config.json (alignment/models/checkpoint.py); a preset that gives them
    is checked against it. A tiny twin is built from them. Facts some architectures lack are null.
    """

    model_type: str = MISSING
    hidden_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    intermediate_size: int = MISSING
    vocab_size: int = MISSING
    # Optional facts: null = not stated (read from the checkpoint, or the transformers class default for a twin).
    max_position_embeddings: Optional[int] = None
    tie_word_embeddings: Optional[bool] = None
    rope_theta: Optional[float] = None
    rms_norm_eps: Optional[float] = None
    sliding_window: Optional[int] = None
    head_dim: Optional[int] = None  # hidden_size / num_attention_heads for most models; Qwen3 and Gemma differ

    def stated(self) -> dict[str, Any]:
        """The facts that have a value (null ones are left to the checkpoint or the transformers class default)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass
class TokenizerConfig(_Frozen):
    pad_token: Optional[str] = None
    padding_side: str = "right"
    # chatml | zephyr: our templates (alignment/models/templates.py, with generation markers); null: the tokenizer's own.
    chat_template: Optional[str] = None


@dataclass
class ModelConfig(_Frozen):
    name: str = MISSING
    # A local model dir, a hub id (offline: from the local HF cache), or a .gguf file. null: the twin preset's
    # model, built offline from `architecture`. A twin preset given a checkpoint trains that checkpoint.
    name_or_path: Optional[str] = None
    gguf_file: Optional[str] = None  # a GGUF file inside name_or_path (a dir or hub repo), dequantized once
    # true: `architecture` is the recipe of a tiny twin (used only while name_or_path is null).
    tiny: bool = False
    license: Optional[str] = None    # the base model's license, for the model card (e.g. apache-2.0)
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    dtype: str = "float32"
    attn_implementation: str = "sdpa"  # flash_attention_2 falls back to sdpa, then eager (modeling.py)
    # true | false | auto. auto: on only when the run does not fit its devices without it (the planner decides, once,
    # at preflight: alignment/plan/checkpointing.py; the choice and why are in the resolved plan).
    gradient_checkpointing: Union[bool, str] = "auto"
    # Reentrant checkpointing (seed 000 uses True); PEFT under DeepSpeed ZeRO-3 needs it.
    use_reentrant: bool = True


@dataclass
class StageConfig(_Frozen):
    """What every stage has. A stage's own settings live in its subclass, defined next to its trainer in
    alignment/stages/<name>.py and found through the stage registry (alignment/config/registry.py): DPO's
    loss_type is in DPOStageConfig, and the evaluation stage carries no learning-rate schedule."""

    name: str = MISSING
    # The Python module that registers the stage; null: alignment.stages.<name>. A new method is one module
    # (its config class, trainer and `register(Stage(...))`) and one YAML that names it here.
    module: Optional[str] = None
    max_length: int = 1024


@dataclass
class TrainingStageConfig(StageConfig):
    """The trainer settings every training stage shares (TRL's TrainingArguments side)."""

    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    # Sequences per optimizer step over all processes: the recipe's number. Gradient accumulation is derived
    # from it (alignment/plan/batch.py), so a run keeps its global batch when the GPU count changes.
    # null: no target, one micro batch per process per step (the global batch then grows with the GPU count).
    global_batch_size: Optional[int] = None
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch_fused"
    logging_steps: int = 1
    eval_steps: Optional[int] = None
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    # Which examples share a micro batch (alignment/stages/batching.py). auto: length-aware wherever the data is
    # padded (each batch drawn from examples of similar padded length: far less padding computed, but a batch is no
    # longer an i.i.d. draw within its mega-batch of up to 50 batches), none needed for packed SFT rows. length: always
    # length-aware. random: uniform batches, exactly TRL's default order (per-step parity with a plain-TRL script).
    batching: str = "auto"
    # transformers' Liger kernels (RMSNorm, RoPE, SwiGLU in Triton; needs the liger-kernel package and a GPU).
    use_liger_kernel: bool = False


@dataclass
class PreferenceStageConfig(TrainingStageConfig):
    """Stages that train on preference pairs (or rows unpaired from them)."""

    # Prompt budget for preference rows, applied by alignment.data before TRL (which no longer has
    # max_prompt_length): the oldest turns go first, the final user turn always stays; null: max_length - 1.
    max_prompt_length: Optional[int] = None


@dataclass
class SourceConfig(_Frozen):
    """One dataset source: where its rows come from and how many of them a stage uses."""

    name: str = MISSING
    # Row layout: ultrachat (messages) | ultrafeedback | orpo (chosen/rejected conversations). It decides
    # the columns checked and the TRL format produced (alignment/data/schemas.py).
    schema: str = MISSING
    path: str = MISSING                     # hub id, or a local .jsonl/.json/.parquet file or directory
    revision: Optional[str] = None          # hub revision (branch, tag or commit); null: the default branch
    train_split: str = "train"
    eval_split: Optional[str] = None
    test_size: float = 0.0                  # > 0: hold out this fraction of train_split as the eval split
    fraction: float = 1.0                   # share of train_split's rows used (after the held-out split)
    rows: Optional[int] = None              # an exact row count instead of a fraction
    eval_rows: Optional[int] = None         # cap on eval rows; null: all


@dataclass
class BadRowPolicy(_Frozen):
    """What to do with a row that fails a check: fail (stop before training) or drop (and count it)."""

    malformed: str = "fail"        # a message is not {role, content}, content is not a string, unknown role
    roles: str = "fail"            # roles do not alternate user/assistant, or the last turn is not the assistant's
    empty: str = "drop"            # a message with empty or whitespace-only content
    identical: str = "drop"        # chosen and rejected responses are the same text
    prompt_mismatch: str = "drop"  # chosen and rejected conversations differ before their final turn


@dataclass
class DatasetConfig(SourceConfig):
    """The stage's primary source, further sources mixed in, and the checks run before training."""

    mix: list[SourceConfig] = field(default_factory=list)
    bad_rows: BadRowPolicy = field(default_factory=BadRowPolicy)
    lint: str = "fail"             # chat-template linter: fail (on errors) | warn | off
    lint_rows: int = 64            # rows of the prepared train split the linter tokenizes
    num_proc: Optional[int] = None  # worker processes for preparation and TRL's tokenization; null: 1
    cache: bool = True             # reuse prepared data from $ALIGNMENT_CACHE/data when the fingerprint matches

    @property
    def sources(self) -> tuple[SourceConfig, ...]:
        return (self, *self.mix)


@dataclass
class FsdpSettings(_Frozen):
    """backend=fsdp: FSDP2 through accelerate. Values live in alignment/conf/backend/fsdp.yaml."""

    wrap_class: Optional[str] = None          # null: the model's decoder layer class (e.g. Qwen2DecoderLayer)
    reshard_after_forward: bool = MISSING     # free gathered layers after forward (ZeRO-3-like memory)
    state_dict_type: str = MISSING            # checkpoints: SHARDED_STATE_DICT (each rank its shard) | FULL_STATE_DICT
    cpu_ram_efficient_loading: bool = MISSING  # rank 0 reads the weights, the others start empty and receive them
    offload_params: bool = MISSING            # keep sharded parameters in CPU memory between uses


@dataclass
class ZeroSettings(_Frozen):
    """backend=zero3: DeepSpeed ZeRO stage 3. Values live in alignment/conf/backend/zero3.yaml (seed 000's json)."""

    overlap_comm: bool = MISSING
    contiguous_gradients: bool = MISSING
    reduce_bucket_size: int = MISSING
    prefetch_bucket_size: int = MISSING          # stage3_prefetch_bucket_size
    param_persistence_threshold: int = MISSING   # stage3_param_persistence_threshold: smaller params stay whole
    gather_16bit_weights_on_model_save: bool = MISSING  # save a from_pretrained-loadable model, not only shards
    zero3_init: bool = MISSING                   # build big models already partitioned
    offload_optimizer: str = MISSING             # none | cpu
    offload_param: str = MISSING                 # none | cpu
    steps_per_print: int = MISSING


@dataclass
class BackendConfig(_Frozen):
    name: str = "single"
    device: str = "auto"
    mixed_precision: str = "auto"
    fsdp: Optional[FsdpSettings] = None      # set by backend=fsdp
    zero3: Optional[ZeroSettings] = None     # set by backend=zero3


@dataclass
class PeftConfig(_Frozen):
    method: str = "none"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"
    # method=qlora: the frozen base is loaded in 4 bits by bitsandbytes (seed 000's settings).
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    # Storage dtype of the packed 4-bit weights; equal to compute_dtype so FSDP can shard them.
    quant_storage: str = "bfloat16"


@dataclass
class RefConfig(_Frozen):
    """Where DPO's reference log-probs come from (alignment/plan/reference.py explains each option)."""

    # auto | adapter_copy | base | separate | precomputed; auto picks the cheapest correct one and says which.
    name: str = "auto"
    path: Optional[str] = None     # ref=separate: a saved model directory or hub id


@dataclass
class LauncherConfig(_Frozen):
    """How many processes on how many machines; alignment/launch/launcher.py starts them, the planner sizes them."""

    # Processes (GPUs) over all machines. null: every visible GPU on each machine; on CPU, 1 for backend=single
    # and 2 for the multi-process backends.
    num_processes: Optional[int] = None
    num_machines: int = 1                   # nodes; > 1 runs under SLURM (launchers/slurm.sbatch)
    machine_rank: Optional[int] = None      # null: 0, or SLURM_NODEID under SLURM
    main_process_ip: Optional[str] = None   # null: 127.0.0.1 on one machine, the first SLURM node on several
    main_process_port: Optional[int] = None  # null: a free port on one machine, 29500 on several
    gpu_memory_gb: float = 80.0             # memory per GPU the plan is checked against (H100/A100 80 GB)
    # A real run compares its plan with the memory free where it runs, before any weight loads or rank starts
    # (alignment/plan/gate.py): refuse (exit 2) when it does not fit, or warn and go on.
    memory_gate: str = "refuse"             # refuse | warn


@dataclass
class TrackerConfig(_Frozen):
    """Where metrics go besides metrics.jsonl and plots/ (alignment/records/trackers.py). Values in alignment/conf/tracker/."""

    name: str = "none"                 # none | wandb | tensorboard
    project: str = "alignment"
    entity: Optional[str] = None
    mode: str = "auto"                 # wandb: auto | offline | online


@dataclass
class PreemptionConfig(_Frozen):
    # SIGTERM/SIGINT: how long after the signal a checkpoint may take before the process exits anyway. Below
    # SLURM's default KillWait (30 s), after which SIGKILL follows; raise it with sbatch --signal=B:TERM@<s>.
    grace_s: float = 25.0


@dataclass
class DiagnosticsConfig(_Frozen):
    """Training-health alarms (alignment/records/diagnostics.py), from seed 000's guide to DPO logs."""

    enabled: bool = True
    after_steps: int = 20            # trend alarms (loss at ln 2, flat accuracy, margins, sinking rewards) wait this long
    window: int = 5                  # logged steps averaged for a trend alarm
    ln2_tolerance: float = 0.01      # |mean loss - ln 2| below this = no preference learned
    grad_norm_low: float = 1.0e-6    # median grad_norm below this = parameters barely move
    grad_norm_high: float = 1.0e3    # grad_norm above this = exploding
    accuracy_band: float = 0.1       # |mean rewards/accuracies - 0.5| below this = coin flip
    sinking_ratio: float = 0.85      # chosen reward fell at least this share of the rejected one's fall
    # Collapse (the run fails): the last `window` grad_norm values all at or below collapse_grad_norm, after an
    # earlier one above grad_norm_low (gradients flowed, then died), with the loss still at or above
    # collapse_loss_ratio × its first value (nothing learned).
    collapse_grad_norm: float = 1.0e-10
    collapse_loss_ratio: float = 0.9


@dataclass
class GenerationConfig(_Frozen):
    """Sampled answers to a fixed prompt set, from the evaluated model and its baseline (alignment/evaluation)."""

    # A .jsonl file (one row per prompt: `prompt` as text or a message list, or `messages`) or a .txt file (one
    # prompt per line); null: the distinct prompts of the dataset's eval split, in order.
    prompts: Optional[str] = None
    num_prompts: int = 32            # the first this many prompts
    samples_per_prompt: int = 1      # answers per prompt and model (sampling); the judge compares each pair
    max_new_tokens: int = 128
    do_sample: bool = True           # false: greedy, and temperature/top_p are ignored
    temperature: float = 0.7
    top_p: float = 1.0
    batch_size: int = 16             # prompts generated together (left-padded)


@dataclass
class JudgeConfig(_Frozen):
    """Who decides which of two answers to a prompt is better (alignment/evaluation/judges.py). alignment/conf/judge/."""

    name: str = "none"               # none | rule | reward_model | http
    # rule: a built-in rule (arithmetic) or `package.module:function` taking (prompt messages, response text)
    # and returning a score; the higher-scoring answer wins, equal scores tie.
    rule: str = "arithmetic"
    path: Optional[str] = None       # reward_model: a sequence-classification model dir or hub id
    url: Optional[str] = None        # http: base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1
    model: Optional[str] = None      # http: the judge model's name at that endpoint
    api_key_env: Optional[str] = "OPENAI_API_KEY"  # http: the variable holding the key (read at call time, never saved)
    timeout_s: float = 60.0          # http: per request
    max_tokens: int = 1024           # http: the judge's answer budget (it explains, then gives the verdict)
    both_orders: bool = True         # http: ask with the answers in both positions; disagreeing verdicts tie
    max_retries: int = 5             # http: retries of one request after a 408/429/5xx, a timeout or a lost connection
    concurrency: int = 4             # http: pairs judged at once (a bounded thread pool)
    backoff_s: float = 1.0           # http: first wait before a retry, doubled each retry, jittered (x0.5..1)
    backoff_max_s: float = 60.0      # http: cap on one wait, a server's Retry-After included


@dataclass
class EvalConfig(_Frozen):
    """Evaluation: `stage=eval`, or after training with eval.after_training=true (alignment/evaluation)."""

    after_training: bool = False
    # Held-out preference accuracy from the implicit reward (chosen vs rejected on the eval split), of the
    # starting model and of the trained one, each against the reference.
    preference: bool = True
    max_pairs: Optional[int] = None  # cap on eval-split pairs scored; null: all
    batch_size: int = 16             # sequences per forward pass when scoring
    # The model the evaluated one is measured against (implicit reward) and judged against (generations):
    # null: its own reference (a DPO run's reference; an SFT run's starting model). Or a run dir, a model dir,
    # an adapter dir or a hub id.
    reference: Optional[str] = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    # Optional lm-evaluation-harness tasks run on the evaluated model (`pip install lm-eval`; the tasks' data
    # must be reachable), e.g. [arc_easy, hellaswag]; empty: none.
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: Optional[int] = None   # examples per task (a quick look); null: all


@dataclass
class RunConfig(_Frozen):
    model: ModelConfig = field(default_factory=ModelConfig)
    # Typed by the chosen stage's own class (the registry's Stage.config): the composed node is converted with it in
    # to_run_config, where a key the stage does not have is refused.
    stage: Any = MISSING
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiment: Optional[str] = None
    # Short keys, the ones people sweep. `beta` is the stage's beta (stages.registry.apply_short_keys maps it onto
    # stage.beta; null: the stage's default), refused for a stage without one. learning_rate: every training stage's.
    beta: Optional[float] = None
    learning_rate: Optional[float] = None
    seed: int = 42
    dry_run: bool = False
    data_report: bool = False
    resume: bool = False
    offline: bool = False
    run_dir: Optional[str] = None
    run_name: Optional[str] = None
    parent_run: Optional[str] = None
    # A parent run that saved a LoRA adapter: keep it (trained on as this stage's adapter) or merge it into
    # its base first, as the handbook does before DPO. auto: keep with peft=lora/qlora, merge with peft=none.
    parent_adapter: str = "auto"
    chain: list[list[str]] = field(default_factory=list)
    # The metric a sweeper optimises (hydra/sweeper=optuna); its held-out eval_ version is used when the run
    # evaluated. Failed members report NaN, which optuna records as a failed trial.
    objective: str = "rewards/accuracies"
    # The command-line overrides that composed this config, as given (hydra.* and config dirs aside): written
    # into config.yaml, so `rerun=<run dir>` composes the same run again. Set by composition, never by hand.
    overrides: list[str] = field(default_factory=list)


def override_key(override: str) -> str:
    """The key an override sets, without Hydra's +/~ prefixes: `+stage.packing=true` → `stage.packing`."""
    return override.split("=", 1)[0].lstrip("+~")


def stage_chosen(overrides: list[str]) -> bool:
    """`stage=...` on the command line means: run that stage alone, even if the experiment chains stages."""
    return any(o.split("=", 1)[0].lstrip("+") == "stage" for o in overrides)


def with_overrides(run_config: RunConfig, overrides: list[str]) -> RunConfig:
    """The config, recording the command-line overrides that composed it (hydra.* ones are Hydra's, not the run's)."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    # stage=... on the command line runs that stage alone: the experiment's chain is not part of this run.
    chain = [] if stage_chosen(kept) else run_config.chain
    return freeze(dataclasses.replace(run_config, overrides=kept, chain=chain))


def as_dict(run_config: RunConfig) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), for YAML/JSON writing."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    def convert(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, (list, tuple)):
            return [convert(v) for v in obj]
        return plain(obj)

    return convert(run_config)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict → {"a.b.c": leaf}, the dotted keys users write on the command line."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
