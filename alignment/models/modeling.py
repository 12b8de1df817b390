"""Loading a stage's tokenizer and weights with the model's settings: template, pad token, attention
implementation (with fallback), dtype, 4-bit quantization, and a kept LoRA adapter."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from alignment.errors import ConfigError
from alignment.config.schema import ModelConfig, PeftConfig, RunConfig
from alignment.config.sources import in_hub_cache
from alignment.models.checkpoint import fact_differences, facts_of, read_config
from alignment.models.source import model_source
from alignment.models.templates import TEMPLATES

log = logging.getLogger(__name__)


def check_model_source(model: ModelConfig, offline: bool, path: str | None = None, key: str = "model.name_or_path"
                       ) -> None:
    """Cheap checks before anything loads: a local checkpoint can be read; a hub id is usable offline."""

    if path is None:
        if model.name_or_path is None:
            return  # a tiny twin, built on first use
        path = model.name_or_path
    source = model_source(path, model.gguf_file if key == "model.name_or_path" else None, key=key)
    if source.local:
        read_config(source, key)  # refuses a missing dir or file, an adapter dir, a non-causal-LM config
        return
    if offline and not in_hub_cache(source.reference):
        raise ConfigError(
            f"{key}={path} is a hub id, the run is offline and it is not in the local Hugging Face cache. "
            f"Use model=tiny_qwen2 (or tiny_mistral) for an offline run, download it on a connected machine, or "
            f"set {key} to a local directory. (A dry run is refused the same way; to plan a run that will download, "
            f"run it where HF_HUB_OFFLINE is unset and offline=false.)"
        )


def load_tokenizer(source: Path | str, model: ModelConfig):
    from transformers import AutoTokenizer


    tokenizer = AutoTokenizer.from_pretrained(str(source))
    pad = model.tokenizer.pad_token
    if pad is not None:
        if pad not in tokenizer.get_vocab():  # setting it would add a new token the embeddings do not have
            raise ConfigError(f"model.tokenizer.pad_token={pad} is not a token of the tokenizer in {source}. Name one "
                              f"of its unused special tokens, or null to keep its own pad token.")
        tokenizer.pad_token = pad
    if tokenizer.pad_token is None:
        raise ConfigError(
            f"the tokenizer of {source} has no pad token. Set model.tokenizer.pad_token to an unused special token "
            f"(not the EOS token, whose label would then be masked)."
        )
    tokenizer.padding_side = model.tokenizer.padding_side
    if model.tokenizer.chat_template is not None:
        tokenizer.chat_template = TEMPLATES[model.tokenizer.chat_template]
    return tokenizer


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, "auto")


def quantization_config(peft: PeftConfig):
    """bitsandbytes 4-bit settings for peft=qlora, else None."""
    if peft.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=peft.quant_type,
        bnb_4bit_use_double_quant=peft.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(peft.compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(peft.quant_storage),
    )


def load_model(source: Path | str, cfg: RunConfig):
    """Full weights from a saved directory or hub id, quantized to 4 bits for peft=qlora."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(cfg.model.dtype)
    quantization = quantization_config(cfg.peft)
    if quantization is not None:
        # The modules bitsandbytes leaves unquantized (norms, embeddings, head) follow the compute dtype.
        dtype = torch_dtype(cfg.peft.compute_dtype)
    elif not uses_cuda(cfg) and dtype in (torch.bfloat16, torch.float16):
        log.info("no CUDA device: loading %s in float32 instead of %s", source, cfg.model.dtype)
        dtype = torch.float32
    extra = {"quantization_config": quantization, "device_map": {"": "cuda" if uses_cuda(cfg) else "cpu"}} \
        if quantization is not None else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(source), dtype=dtype, attn_implementation=attention_implementation(cfg), **extra
    )
    if quantization is not None and not uses_cuda(cfg):
        _keep_4bit_layout_on_cpu(model)
    return model


def check_architecture(source: Path | str, cfg: RunConfig) -> None:
    """The checkpoint must be the architecture the config describes: plans and LoRA checks were made from it."""
    from transformers import AutoConfig


    wrong = fact_differences(cfg.model.architecture.stated(), facts_of(AutoConfig.from_pretrained(str(source))))
    if wrong:
        details = "; ".join(f"{k}: {d} in model={cfg.model.name}, {a} in config.json" for k, d, a in wrong)
        raise ConfigError(f"{source} is not the architecture model={cfg.model.name} declares ({details}). "
                          f"Fix model.architecture or point model.name_or_path at the right checkpoint.")


def load_policy(start, cfg: RunConfig):
    """The model a stage trains: full weights, or a kept parent adapter (trainable) on its base."""
    check_architecture(start.weights, cfg)
    model = load_model(start.weights, cfg)
    if not start.has_adapter:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(start.adapter), is_trainable=True)


# Tried in this order: each entry falls back to the ones after it.
ATTENTION_FALLBACK = ("flash_attention_2", "sdpa", "eager")


def attention_implementation(cfg: RunConfig) -> str:
    """The configured attention implementation if it can run here, else the next one that can (logged).

    flash_attention_2 needs the flash-attn package and a CUDA device; sdpa needs a model class that
    supports it. A missing kernel is never a crash: the run goes on with the next implementation.
    """
    requested = cfg.model.attn_implementation
    if requested not in ATTENTION_FALLBACK:
        return requested  # another implementation transformers knows (e.g. flex_attention): its own checks apply
    for candidate in ATTENTION_FALLBACK[ATTENTION_FALLBACK.index(requested):]:
        missing = _attention_unavailable(candidate, cfg)
        if missing is None:
            if candidate != requested:
                log.warning("attention: %s is not available here, using %s instead", requested, candidate)
            return candidate
        log.info("attention: %s unavailable (%s)", candidate, missing)
    return "eager"


def _attention_unavailable(name: str, cfg: RunConfig) -> str | None:
    """Why an attention implementation cannot run for this model here, or None when it can."""
    if name == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not uses_cuda(cfg):
            return "no CUDA device"
        if not is_flash_attn_2_available():
            return "the flash-attn package is not installed"
    if name in ("flash_attention_2", "sdpa"):
        support = "_supports_flash_attn" if name == "flash_attention_2" else "_supports_sdpa"
        if not getattr(model_class(cfg.model.architecture.model_type), support, False):
            return f"{cfg.model.architecture.model_type} models do not support it"
    return None


def model_class(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config_class = type(AutoConfig.for_model(model_type))
    return AutoModelForCausalLM._model_mapping[config_class]


def config_of_facts(arch):
    """The transformers config the stated facts describe (class defaults for the rest)."""
    from transformers import AutoConfig

    facts = arch.stated()
    return AutoConfig.for_model(facts.pop("model_type"), **facts)


def meta_model_of_facts(arch):
    """The class the facts alone describe, on the meta device (for plans of models no checkpoint is at hand for)."""
    return _meta_model(config_of_facts(arch).to_json_string(use_diff=False))


def transformers_config(model: ModelConfig):
    """The model's transformers config: the checkpoint's own when it can be read here, else built from the facts."""

    if model.name_or_path is not None:
        config = read_config(model_source(model.name_or_path, model.gguf_file))
        if config is not None:
            return config
    return config_of_facts(model.architecture)


@functools.lru_cache(maxsize=8)
def _meta_model(config_json: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = json.loads(config_json)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def meta_model(model: ModelConfig):
    """The model built from the real transformers class on the meta device: no memory, no download."""
    return _meta_model(transformers_config(model).to_json_string(use_diff=False))


def linear_shape(module) -> tuple[int, int] | None:
    """(in, out) features of a linear layer: torch's Linear, or the Conv1D GPT-2-style models use (peft targets both)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def linear_module_names(model: ModelConfig) -> list[str]:
    """Short names of the model's linear layers (q_proj, ..., lm_head): what peft.target_modules can name."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in meta_model(model).named_modules()
                   if linear_shape(module) is not None})


def check_target_modules(cfg: RunConfig) -> None:
    """LoRA target modules must exist in the model; say which ones do when they do not."""
    targets = cfg.peft.target_modules
    if cfg.peft.method == "none" or isinstance(targets, str):
        return  # "all-linear" (or a regex string, which peft matches itself)
    present = linear_module_names(cfg.model)
    absent = [t for t in targets if t not in present]
    if absent:
        raise ConfigError(
            f"peft.target_modules names {', '.join(absent)}, which {cfg.model.name} "
            f"({cfg.model.architecture.model_type}) does not have. Its linear layers are: {', '.join(present)}. "
            f"Use some of these, or peft.target_modules=all-linear.")


def _keep_4bit_layout_on_cpu(model) -> None:
    """Turn off bitsandbytes' CPU inference repacking for 4-bit layers.

    On CPUs with AVX512-BF16, a 4-bit layer called without gradients (DPO's reference pass, evaluation)
    repacks its weight in place into a CPU-only layout; with these shapes that fails (bitsandbytes 0.50:
    "shape [64, 2] is invalid for input of size 160"), and it would change the frozen base under the
    training passes. The plain de-quantize-and-matmul path is correct everywhere.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_config(peft: PeftConfig):
    if peft.method == "none":  # lora and qlora both train LoRA adapters
        return None
    from peft import LoraConfig

    targets = peft.target_modules if isinstance(peft.target_modules, str) else list(peft.target_modules)
    return LoraConfig(r=peft.r, lora_alpha=peft.alpha, lora_dropout=peft.dropout, target_modules=targets,
                      task_type="CAUSAL_LM")


def uses_cuda(cfg: RunConfig) -> bool:
    import torch

    if cfg.backend.device == "cpu":
        return False
    return torch.cuda.is_available()


def mixed_precision(cfg: RunConfig) -> str:
    """'bf16', 'fp16' or 'no': auto picks bf16 on a bf16-capable GPU and full precision on CPU."""
    import torch

    choice = cfg.backend.mixed_precision
    if choice == "auto":
        return "bf16" if uses_cuda(cfg) and torch.cuda.is_bf16_supported() else "no"
    return choice
