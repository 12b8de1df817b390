"""The engines behind backend=ddp|fsdp|zero3: their generated configs, their checks, and what actually ran.

The accelerate config (and DeepSpeed's json for zero3) are written into `<run_dir>/launch/` from the
RunConfig; nothing here is a second hand-edited copy of a setting. Batch sizes, accumulation, clipping and
precision in the DeepSpeed json are "auto": transformers fills them per stage from the trainer arguments,
which come from alignment/plan/batch.py, so a chain's SFT and DPO links can share one launch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignment.errors import ConfigError
from alignment.config.schema import RunConfig
from alignment.models.modeling import meta_model, model_class
from alignment.runtime.optional import require_importable
from alignment.models.modeling import mixed_precision, uses_cuda
from alignment.runtime.ranks import world_size

ACCELERATE_TYPES = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero3": "DEEPSPEED"}


def wrap_class(cfg: RunConfig) -> str:
    """The module class FSDP wraps one unit at a time: the configured one, else the model's decoder layer."""
    configured = cfg.backend.fsdp.wrap_class if cfg.backend.fsdp else None
    return configured or wrap_class_default(cfg)


def check_wrap_class(cfg: RunConfig) -> None:
    """Every class named for FSDP wrapping must exist in the model, or FSDP would silently shard nothing per layer."""
    present = {type(module).__name__ for module in meta_model(cfg.model).modules()}
    missing = [name for name in wrap_class(cfg).split(",") if name.strip() not in present]
    if missing:
        layers = sorted(name for name in present if name.endswith("Layer"))
        raise ConfigError(
            f"backend.fsdp.wrap_class={','.join(missing)} is not a module class of {cfg.model.name} "
            f"({cfg.model.architecture.model_type}). Its layer classes: {', '.join(layers)}. "
            f"Use backend.fsdp.wrap_class=null for the decoder layer ({wrap_class_default(cfg)}).")


def wrap_class_default(cfg: RunConfig) -> str:
    return ",".join(model_class(cfg.model.architecture.model_type)._no_split_modules)


def check_engine_installed(cfg: RunConfig) -> None:
    if cfg.backend.name != "zero3":
        return
    require_importable("deepspeed", "backend=zero3 needs DeepSpeed",
                       "Install it (`pip install deepspeed`), or use backend=fsdp, which shards the same way with "
                       "PyTorch alone.")


def accelerate_config(cfg: RunConfig, deepspeed_json: Path) -> dict[str, Any]:
    """`accelerate launch --config_file` contents. Complete on its own (`accelerate launch --config_file
    launch/accelerate.yaml -m alignment ...` works as-is on machine 0); the launch command line repeats the counts
    and adds the machine rank and rendezvous address of a multi-machine job."""

    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": ACCELERATE_TYPES[cfg.backend.name],
        "num_processes": cfg.launcher.num_processes,
        "num_machines": cfg.launcher.num_machines,
        "machine_rank": 0,
        "mixed_precision": mixed_precision(cfg),
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,  # on CPU the ranks set use_cpu on their trainer: the launcher path ignores it here
    }
    if cfg.backend.name == "fsdp":
        fsdp = cfg.backend.fsdp
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": wrap_class(cfg),
            "fsdp_reshard_after_forward": fsdp.reshard_after_forward,
            "fsdp_state_dict_type": fsdp.state_dict_type,
            "fsdp_cpu_ram_efficient_loading": fsdp.cpu_ram_efficient_loading,
            "fsdp_offload_params": fsdp.offload_params,
            # Activation checkpointing is the trainer's (model.gradient_checkpointing), never a second switch.
            "fsdp_activation_checkpointing": False,
        }
    if cfg.backend.name == "zero3":
        config["deepspeed_config"] = {
            "deepspeed_config_file": str(deepspeed_json),
            "zero3_init_flag": cfg.backend.zero3.zero3_init,
            "deepspeed_multinode_launcher": "standard",
        }
        del config["mixed_precision"]  # precision comes from the json (filled from the trainer arguments)
    return config


def deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
    """DeepSpeed's json: seed 000's ZeRO-3 settings; per-stage numbers left to transformers ("auto")."""
    zero = cfg.backend.zero3
    optimization: dict[str, Any] = {
        "stage": 3,
        "overlap_comm": zero.overlap_comm,
        "contiguous_gradients": zero.contiguous_gradients,
        "reduce_bucket_size": zero.reduce_bucket_size,
        "stage3_prefetch_bucket_size": zero.prefetch_bucket_size,
        "stage3_param_persistence_threshold": zero.param_persistence_threshold,
        "stage3_gather_16bit_weights_on_model_save": zero.gather_16bit_weights_on_model_save,
    }
    for part in ("optimizer", "param"):
        device = getattr(zero, f"offload_{part}")
        if device != "none":
            optimization[f"offload_{part}"] = {"device": device, "pin_memory": True}
    return {
        "zero_optimization": optimization,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": zero.steps_per_print,
    }


def arm_engine(cfg: RunConfig) -> None:
    """Run after the trainer arguments exist (they create accelerate's process state) and before the trainer.

    FSDP on CPU: accelerate keeps the FSDP plugin only for GPU-like distributed types and silently runs plain
    DDP on MULTI_CPU (see notes/distributed-on-cpu.md). Presenting MULTI_GPU to the accelerator state once
    makes it store the plugin and switch to FSDP; the device stays the CPU and the process group stays gloo.
    """

    if cfg.backend.name != "fsdp" or uses_cuda(cfg) or world_size() <= 1:
        return
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    if state.distributed_type == DistributedType.MULTI_CPU and not AcceleratorState._shared_state:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def engine_report(trainer, cfg: RunConfig) -> dict[str, Any]:
    """What actually ran, read from the trained objects: a backend that silently fell back shows here."""
    state = trainer.accelerator.state
    report: dict[str, Any] = {"backend": cfg.backend.name, "world_size": state.num_processes,
                              "distributed_type": state.distributed_type.value, "device": str(trainer.args.device),
                              "process_group": _process_group_backend()}
    parameters = list(trainer.model.named_parameters())
    if cfg.backend.name == "fsdp":
        from torch.distributed.tensor import DTensor

        sharded = [(name, p) for name, p in parameters if isinstance(p, DTensor)]
        report["sharded_parameters"] = f"{len(sharded)}/{len(parameters)}"
        report["shards"] = {name: {"global": list(p.shape), "local": list(p.to_local().shape)}
                            for name, p in sharded[:3]}
    if cfg.backend.name == "zero3":
        managed = [(name, p) for name, p in parameters if hasattr(p, "ds_id")]
        partitioned = [(name, p) for name, p in managed if not getattr(p, "ds_persist", False)]
        # Parameters below stage3_param_persistence_threshold stay whole on every rank by design.
        report["managed_parameters"] = f"{len(managed)}/{len(parameters)}"
        report["partitioned_parameters"] = f"{len(partitioned)}/{len(parameters)}"
        report["shards"] = {name: {"global": list(p.ds_shape), "local_numel": p.ds_tensor.numel()}
                            for name, p in partitioned[:3]}
    return report


def _process_group_backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def save_model(trainer, path: Path) -> None:
    """The final model, whole and loadable by from_pretrained, whatever the backend sharded during training.

    FSDP checkpoints stay sharded (fast, resumable); the final save gathers a full state dict instead.
    ZeRO-3 gathers through stage3_gather_16bit_weights_on_model_save. Every rank must call this (collectives).
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(path))
