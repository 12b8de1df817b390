"""The memory planner: will this run fit, per device, before anything loads?

From the architecture facts, precision, peft, reference option, optimizer, backend, world size, micro
batch, sequence length and checkpointing, it sums per-device bytes for each term and names the largest
one with what to change. Every bytes-per-parameter or bytes-per-element assumption is in ASSUMPTIONS;
the formulas below only count parameters and activation elements. BENCHMARKS.md compares the totals
with measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from alignment.config.schema import ArchitectureConfig, RunConfig
from alignment.config.registry import stage_of
from alignment.models.modeling import linear_module_names, linear_shape, meta_model, meta_model_of_facts

GB = 1e9  # decimal gigabytes, as GPU memory is quoted (80 GB H100)

# Bytes per parameter or per element. One place; the planner reads nothing else.
ASSUMPTIONS = {
    "dtype_bytes": {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2},
    # bitsandbytes nf4/fp4: 4-bit weights plus one absmax per 64-weight block, itself quantized to 8 bits
    # with one fp32 constant per 256 blocks under double quantization (QLoRA paper, section 2).
    "quant4_bytes": {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64},
    # Optimizer state bytes per trainable parameter, as a multiple of the trainable dtype's bytes (AdamW:
    # exp_avg and exp_avg_sq in the parameter's dtype) or as absolute bytes (8-bit optimizers).
    "optimizer_states": {"adamw_torch": 2, "adamw_torch_fused": 2, "adamw_hf": 2, "adamw": 2, "sgd": 0,
                         "adafactor": 0.1},
    "optimizer_bytes_absolute": {"adamw_bnb_8bit": 2, "adamw_8bit": 2, "paged_adamw_8bit": 2,
                                 "paged_adamw_32bit": 8},
    # LoRA adapters: peft upcasts them to fp32 on an unquantized base; TRL casts QLoRA adapters to bf16.
    "lora_dtype": {"lora": "float32", "qlora": "bfloat16"},
    # DDP keeps a gradient bucket copy (gradient_as_bucket_view is off by default).
    "ddp_gradient_copies": 1,
    # Sharded backends gather whole decoder layers around the one computing: itself plus one prefetched.
    "gathered_layers": 2,
    # Activation elements saved per token per decoder layer for backward (HF Llama/Qwen2/Mistral layer,
    # sdpa attention): two RMSNorm inputs and outputs, q, attention output, o_proj input and the norms' and
    # rotary embedding's intermediates ≈ 8h, k and v = 2·kv, and gate, up, SiLU(gate), SiLU·up = 4·I.
    # Checked against the tensors autograd saves (tests/test_plan.py): within a few percent.
    "layer_activation": {"hidden": 8, "kv": 2, "intermediate": 4},
    # LoRA dropout keeps a dropped copy of each target's input and a 1-byte mask: q, k, v, o, gate and up
    # take h, down takes I; each of the 7 adapters also saves its rank-r intermediate.
    "lora_dropout_activation": {"hidden": 6, "intermediate": 1, "mask_bytes": 1, "rank_outputs": 7},
    # A frozen base needs no weight gradients, so autograd skips the inputs kept only for them (the two
    # RMSNorm outputs for their weights and part of the attention block): about 3.5h fewer elements.
    "frozen_base_saving_hidden": 3.5,
    # Backward holds, on top of what was saved, the gradients flowing through the layer it is in and the
    # one before: two layers' activations. With checkpointing the layer being rebuilt is most of that
    # working set (counted as the one recomputed layer); a third of a layer more covers the rest. Both
    # factors are fitted on the 105M twin's measured peaks (BENCHMARKS.md), not derived.
    "backward_layers": {False: 2, True: 0.35},
    # TRL 1.16 computes both losses through a chunked log-prob head (tiles of at most 4096 tokens × 32768
    # vocabulary entries). Its backward holds about 23 bytes per token and vocabulary entry of a tile on the
    # torch path (measured on SmolLM2-135M's 49,152-entry vocabulary, CPU: bench/smollm2_memory.py): the bytes
    # beyond what `logit_bytes_per_vocab_entry` counts are the "LM head working set". With a trainable head (full
    # fine-tuning) the gradients term, counted whole at a peak when only the head's gradient exists yet, already
    # covers it (measured +5% / +7% without it), so it is counted for frozen bases only. A Triton kernel (GPU)
    # may hold less: unmeasured, so this errs on the side of "does not fit".
    "lm_head_tile_tokens": 4096,
    "lm_head_backward_bytes_per_vocab_entry": 23,
    # Allocator slack and the framework's buffers (CUDA context and cache on GPU, allocator on CPU).
    "overhead_fraction": 0.05,
}

# Decoder layers whose saved activations the formula above was checked against (tests/test_plan.py counts what
# autograd saves): pre-norm attention with q/k/v/o (or fused qkv) and a gated SiLU MLP. For any other layout
# the planner counts weights, gradients, optimizer states and the reference exactly, and says that it does
# not model the activations instead of guessing them.
# Measured (tests/test_own_models.py): qwen3 (q/k norms, head_dim ≠ hidden/heads) and phi3 (fused projections)
# fall outside 10%, so they are not claimed.
ACTIVATION_LAYOUTS = ("llama", "mistral", "qwen2", "olmo2")


@dataclass(frozen=True)
class ParameterGroups:
    """Parameter counts by role, read from the real transformers class on the meta device (any architecture)."""

    embed: int
    head: int        # 0 when the output head is tied to the input embeddings
    biases: int      # biases of the decoder layers' linear layers
    linear: int      # the decoder layers' linear weights: what 4-bit quantization and LoRA act on
    per_layer_linear: int
    other: int       # norms and anything else outside the linear layers
    # (short name, in_features, out_features) of each linear layer of one decoder layer: LoRA's shapes.
    layer_linears: tuple[tuple[str, int, int], ...] = ()

    @property
    def total(self) -> int:
        return self.embed + self.head + self.biases + self.linear + self.other


@dataclass(frozen=True)
class PlanInputs:
    arch: ArchitectureConfig
    groups: Optional[ParameterGroups] = None  # null: counted from `arch` (the class built from the facts)
    stage: str = "dpo"                 # the stage's name, for the report
    # From the stage's registry entry (alignment/config/registry.py): rows forwarded per example (DPO forwards chosen
    # and rejected together: 2) and bytes per token and vocabulary entry of the full logits it holds (SFT materialises
    # the logits, their fp32 upcast and its gradient: 8; TRL's DPO trainer uses a tiled LM head: 0).
    sequences_per_example: int = 2
    logit_bytes_per_vocab_entry: int = 0
    dtype: str = "bfloat16"            # weights and compute
    peft: str = "none"                 # none | lora | qlora
    lora_r: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    double_quant: bool = True
    reference: str = "base"            # adapter_copy | base | separate | precomputed
    optimizer: str = "adamw_torch_fused"
    backend: str = "single"            # single | ddp | fsdp | zero3
    world_size: int = 1
    micro_batch: int = 1
    seq_len: int = 1024
    checkpointing: bool = False
    gpu_memory_gb: float = 80.0


@dataclass
class MemoryPlan:
    inputs: PlanInputs
    terms: dict[str, float]            # bytes per device
    notes: list[str] = field(default_factory=list)
    unmodelled: tuple[str, ...] = ()   # terms the planner cannot estimate for this layout (counted as 0)

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool | None:
        """True, False, or None when the modelled terms fit but unmodelled ones might not."""
        within = self.total <= self.inputs.gpu_memory_gb * GB
        return None if within and self.unmodelled else within

    @property
    def verdict(self) -> str:
        return {True: "fits", False: "does NOT fit", None: "unknown"}[self.fits]

    @property
    def largest(self) -> str:
        return max(self.terms, key=self.terms.get)

    def advice(self) -> list[str]:
        """What to change, for the terms that dominate, cheapest first."""
        i, tips = self.inputs, []
        big = sorted(self.terms, key=self.terms.get, reverse=True)[:2]
        sharded = i.backend in ("fsdp", "zero3")
        if ("weights" in big or "optimizer" in big or "gradients" in big) and not sharded:
            tips.append("shard across GPUs: backend=fsdp or backend=zero3 with more launcher.num_processes")
        if ("optimizer" in big or "gradients" in big) and i.peft == "none":
            tips.append("train LoRA adapters instead of every weight: peft=lora (or peft=qlora for a 4-bit base)")
        if "weights" in big and i.peft == "lora":
            tips.append("quantize the frozen base to 4 bits: peft=qlora")
        if "reference" in big:
            tips.append("drop the in-memory reference: ref=precomputed, or ref=base / adapter_copy with LoRA")
        if "activations" in big or "logits" in big or "backward working set" in big or "LM head working set" in big:
            if not i.checkpointing:
                tips.append("recompute activations: model.gradient_checkpointing=true")
            tips.append("a smaller stage.per_device_train_batch_size (raise gradient_accumulation_steps) or "
                        "stage.max_length")
        return tips

    def format(self) -> str:
        i = self.inputs
        where = f"{i.world_size} × {i.gpu_memory_gb:g} GB, backend {i.backend}"
        lines = [f"memory plan per device ({where}; {i.stage}, {i.dtype}, peft {i.peft}, ref {i.reference}, "
                 f"{i.optimizer}, micro batch {i.micro_batch} × {i.seq_len} tokens, checkpointing "
                 f"{'on' if i.checkpointing else 'off'}):"]
        for name, value in self.terms.items():
            lines.append(f"  {name:<22}{'not modelled' if name in self.unmodelled else f'{value / GB:9.2f} GB':>12}")
        lines.append(f"  {'total':<22}{self.total / GB:9.2f} GB of {i.gpu_memory_gb:g} GB"
                     + (" (without the unmodelled terms)" if self.unmodelled else ""))
        lines.append(f"verdict: {self.verdict}; largest term: {self.largest} ({self.terms[self.largest] / GB:.2f} GB)")
        if self.fits is False:
            lines.extend(f"  to fit: {tip}" for tip in self.advice())
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def parameter_groups(meta) -> ParameterGroups:
    """Count a model built on the meta device: embeddings, head, decoder-layer linears, biases, the rest."""

    embed_weight = meta.get_input_embeddings().weight
    head = meta.get_output_embeddings()
    head_count = 0 if head is None or head.weight is embed_weight else head.weight.numel()
    layers = _decoder_layers(meta)
    linear = biases = 0
    for layer in layers:
        for module in layer.modules():
            if linear_shape(module) is not None:
                linear += module.weight.numel()
                biases += module.bias.numel() if module.bias is not None else 0
    total = sum(p.numel() for p in meta.parameters())
    shapes = tuple((name.rsplit(".", 1)[-1], *linear_shape(m)) for name, m in layers[0].named_modules()
                   if linear_shape(m) is not None) if len(layers) else ()
    return ParameterGroups(embed=embed_weight.numel(), head=head_count, biases=biases, linear=linear,
                           per_layer_linear=linear // max(len(layers), 1),
                           other=total - embed_weight.numel() - head_count - biases - linear, layer_linears=shapes)


def _decoder_layers(meta):
    """The model's decoder layers: the modules of its FSDP no-split class (its decoder layer)."""
    names = set(getattr(meta, "_no_split_modules", None) or [])
    return [m for m in meta.modules() if type(m).__name__ in names]


def groups_of(arch: ArchitectureConfig) -> ParameterGroups:
    """Parameter groups of the model the facts describe (the real class, built on the meta device)."""

    return parameter_groups(meta_model_of_facts(arch))


def parameter_count(arch: ArchitectureConfig) -> int:
    """Exact parameter count of the model the facts describe."""
    return groups_of(arch).total


def model_parameter_count(model) -> int:
    """Exact parameter count of a configured model: its checkpoint's own class and config when readable."""

    return parameter_groups(meta_model(model)).total


def lora_parameter_count(groups: ParameterGroups, layers: int, r: int, targets: tuple[str, ...]) -> int:
    """r · (in + out) for every targeted linear layer in every decoder layer."""
    return layers * sum(r * (n_in + n_out) for name, n_in, n_out in groups.layer_linears if name in targets)


def plan_memory(i: PlanInputs) -> MemoryPlan:
    a = ASSUMPTIONS
    arch = i.arch
    groups = i.groups or groups_of(arch)
    width = a["dtype_bytes"][i.dtype]
    shards = i.world_size if i.backend in ("fsdp", "zero3") else 1
    notes = []

    # Frozen or trained weights of the policy.
    if i.peft == "qlora":
        full_weights = groups.linear * a["quant4_bytes"][i.double_quant] + (groups.total - groups.linear) * width
    else:
        full_weights = groups.total * width
    if i.peft == "none":
        trainable, train_width = groups.total, width
    else:
        trainable = lora_parameter_count(groups, arch.num_hidden_layers, i.lora_r, i.lora_targets)
        lora_dtype = a["lora_dtype"][i.peft]
        if i.backend == "zero3" and i.peft == "lora":
            lora_dtype = i.dtype  # TRL keeps adapters in the base dtype under ZeRO-3 (mixed dtypes break it)
        train_width = a["dtype_bytes"][lora_dtype]
    adapters = trainable * train_width if i.peft != "none" else 0.0
    weights = full_weights / shards
    gradients = trainable * train_width / shards
    if i.backend == "ddp":
        gradients *= 1 + a["ddp_gradient_copies"]
    if i.optimizer in a["optimizer_bytes_absolute"]:
        optimizer = trainable * a["optimizer_bytes_absolute"][i.optimizer] / shards
    else:
        optimizer = trainable * train_width * a["optimizer_states"].get(i.optimizer, 2) / shards

    reference = {"adapter_copy": adapters, "base": 0.0, "precomputed": 0.0,
                 "separate": full_weights}.get(i.reference, 0.0) / shards
    if i.reference == "precomputed":
        notes.append("ref=precomputed: one forward pass over the data before training; no reference in memory")

    gathered = 0.0
    if shards > 1:
        layer_bytes = full_weights / groups.total * (groups.per_layer_linear + 2 * arch.hidden_size)
        root_bytes = (groups.embed + groups.head) * width
        gathered = max(a["gathered_layers"] * layer_bytes, root_bytes if i.backend == "fsdp" else 0.0)

    rows = i.micro_batch * i.sequences_per_example
    tokens = rows * i.seq_len
    kv = arch.num_key_value_heads * (arch.head_dim or arch.hidden_size // arch.num_attention_heads)
    act = a["layer_activation"]
    per_layer = (act["hidden"] * arch.hidden_size + act["kv"] * kv + act["intermediate"] * arch.intermediate_size
                 ) * width
    if i.peft != "none":
        drop = a["lora_dropout_activation"]
        per_layer += (drop["rank_outputs"] * i.lora_r - a["frozen_base_saving_hidden"] * arch.hidden_size) * width
        if i.lora_dropout > 0:
            dropped = drop["hidden"] * arch.hidden_size + drop["intermediate"] * arch.intermediate_size
            per_layer += dropped * (width + drop["mask_bytes"])
    if i.checkpointing:  # each layer's input is kept; one layer's activations are rebuilt at a time
        per_token = arch.num_hidden_layers * arch.hidden_size * width + per_layer
    else:
        per_token = arch.num_hidden_layers * per_layer
    activations = tokens * per_token
    backward = tokens * per_layer * a["backward_layers"][i.checkpointing]
    logits = tokens * arch.vocab_size * i.logit_bytes_per_vocab_entry
    head_working_set = 0.0
    if i.peft != "none":
        head_working_set = (min(tokens, a["lm_head_tile_tokens"]) * arch.vocab_size
                            * (a["lm_head_backward_bytes_per_vocab_entry"] - i.logit_bytes_per_vocab_entry))

    terms = {"weights": weights, "trainable weights": adapters / shards, "gradients": gradients,
             "optimizer": optimizer, "reference": reference, "gathered for compute": gathered,
             "activations": activations, "backward working set": backward, "logits": logits,
             "LM head working set": head_working_set}
    unmodelled: tuple[str, ...] = ()
    if arch.model_type not in ACTIVATION_LAYOUTS:
        unmodelled = ("activations", "backward working set")
        for name in unmodelled:
            terms[name] = 0.0
        notes.append(f"activations are not modelled for {arch.model_type} decoder layers (modelled: "
                     f"{', '.join(ACTIVATION_LAYOUTS)}): the total counts weights, states and logits only")
    terms["overhead"] = a["overhead_fraction"] * sum(terms.values())
    return MemoryPlan(i, terms, notes, unmodelled)


def plan_inputs(cfg: RunConfig, reference: str, dtype: Optional[str] = None, backend: Optional[str] = None,
                world_size: Optional[int] = None, checkpointing: Optional[bool] = None) -> PlanInputs:
    """The planner's inputs for a composed run; dtype/backend/world_size/checkpointing override the config's (for
    what-ifs, for CPU runs, which train in float32: run_dtype, and for the checkpointing choice being made).

    Checkpointing: model.gradient_checkpointing when it is true or false; for `auto`, the caller passes the choice the
    resolved plan made (plan_of(cfg).gradient_checkpointing, alignment/plan/checkpointing.py): the one source of it."""

    peft, described = cfg.peft, stage_of(cfg)
    targets = peft.target_modules
    if isinstance(targets, str):  # all-linear: every projection but the output head
        targets = tuple(t for t in linear_module_names(cfg.model) if t != "lm_head")
    if checkpointing is None:
        checkpointing = cfg.model.gradient_checkpointing
        if not isinstance(checkpointing, bool):  # the plan is made with this planner: its caller passes the choice
            raise ValueError(f"model.gradient_checkpointing={checkpointing}: pass the resolved choice, "
                             f"plan_inputs(..., checkpointing=plan_of(cfg).gradient_checkpointing)")
    return PlanInputs(
        arch=cfg.model.architecture, groups=parameter_groups(meta_model(cfg.model)), stage=cfg.stage.name,
        sequences_per_example=described.sequences_per_example,
        logit_bytes_per_vocab_entry=described.logit_bytes_per_vocab_entry, dtype=dtype or cfg.model.dtype, peft=peft.method,
        lora_r=peft.r, lora_dropout=peft.dropout, lora_targets=tuple(targets), double_quant=peft.double_quant,
        reference=reference if described.reference else "base", optimizer=cfg.stage.optim,
        backend=backend or cfg.backend.name, world_size=world_size or cfg.launcher.num_processes,
        micro_batch=cfg.stage.per_device_train_batch_size, seq_len=cfg.stage.max_length,
        checkpointing=checkpointing, gpu_memory_gb=cfg.launcher.gpu_memory_gb)


def run_dtype(cfg: RunConfig, cuda: bool) -> str:
    """The dtype the run's unquantized weights and activations take (alignment/models/modeling.py load_model):
    QLoRA's compute dtype; on CPU float32 in place of a 16-bit dtype; else model.dtype."""
    if cfg.peft.method == "qlora":
        return cfg.peft.compute_dtype
    if not cuda and cfg.model.dtype in ("bfloat16", "float16"):
        return "float32"
    return cfg.model.dtype


def what_if(inputs: PlanInputs, **changes) -> MemoryPlan:
    return plan_memory(replace(inputs, **changes))
