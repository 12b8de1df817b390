"""Where a stage's weights come from, and loading them with the configured tokenizer settings."""

from __future__ import annotations

import logging
from pathlib import Path

from .config import ConfigError, ModelConfig, PeftConfig, RunConfig
from .rundir import RunDir
from .sources import in_hub_cache, looks_local

log = logging.getLogger(__name__)


def check_model_source(model: ModelConfig, offline: bool) -> None:
    """Cheap checks before anything loads: a local path exists; a hub id is usable offline."""
    if model.tiny:
        return
    if looks_local(model.name_or_path):
        if not (Path(model.name_or_path).expanduser() / "config.json").exists():
            raise ConfigError(
                f"model.name_or_path={model.name_or_path} does not exist locally (no config.json there). "
                f"Point it at a directory saved with save_pretrained, or use model=tiny_qwen2 for an offline run."
            )
        return
    if offline and not in_hub_cache(model.name_or_path):
        raise ConfigError(
            f"model.name_or_path={model.name_or_path} is a hub id, the run is offline and it is not in the local "
            f"Hugging Face cache. Use model=tiny_qwen2 (or tiny_mistral) for an offline run, download it on a "
            f"connected machine, or set model.name_or_path to a local directory. dry_run=true needs no weights."
        )


def starting_point(cfg: RunConfig) -> Path | str:
    """The weights this stage starts from: a parent run's model, a tiny twin, or the configured model."""
    if cfg.parent_run:
        return RunDir(Path(cfg.parent_run)).model
    if cfg.model.tiny:
        from .tiny import ensure_tiny_model

        return ensure_tiny_model(cfg.model, cfg.seed)
    return cfg.model.name_or_path


def load_tokenizer(source: Path | str, model: ModelConfig):
    from transformers import AutoTokenizer

    from .tiny import CHATML_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if model.tokenizer.pad_token is not None:
        tokenizer.pad_token = model.tokenizer.pad_token
    if tokenizer.pad_token is None:
        raise ConfigError(
            f"the tokenizer of {source} has no pad token. Set model.tokenizer.pad_token to an unused special token "
            f"(not the EOS token, whose label would then be masked)."
        )
    tokenizer.padding_side = model.tokenizer.padding_side
    if model.tokenizer.chat_template == "chatml" and not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _torch_dtype(name: str):
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
        bnb_4bit_compute_dtype=_torch_dtype(peft.compute_dtype),
        bnb_4bit_quant_storage=_torch_dtype(peft.quant_storage),
    )


def load_model(source: Path | str, cfg: RunConfig):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = _torch_dtype(cfg.model.dtype)
    quantization = quantization_config(cfg.peft)
    if quantization is not None:
        # The modules bitsandbytes leaves unquantized (norms, embeddings, head) follow the compute dtype.
        dtype = _torch_dtype(cfg.peft.compute_dtype)
    elif not uses_cuda(cfg) and dtype in (torch.bfloat16, torch.float16):
        log.info("no CUDA device: loading %s in float32 instead of %s", source, cfg.model.dtype)
        dtype = torch.float32
    extra = {"quantization_config": quantization, "device_map": {"": "cuda" if uses_cuda(cfg) else "cpu"}} \
        if quantization is not None else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(source), dtype=dtype, attn_implementation=cfg.model.attn_implementation, **extra
    )
    if quantization is not None and not uses_cuda(cfg):
        _keep_4bit_layout_on_cpu(model)
    return model


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
