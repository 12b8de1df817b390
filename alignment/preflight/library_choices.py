"""Enumerated training settings checked against the installed libraries' own lists, without importing them."""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from pathlib import Path
from typing import Any

from alignment.config.schema import RunConfig
from alignment.errors import one_of, require
from alignment.models.modeling import uses_cuda
from alignment.runtime.optional import require_importable
from alignment.config.registry import stage_of


# ------------------------------------------------------------------------------------------------------------------
# Enumerated training settings, checked against the installed libraries' own lists (transformers' OptimizerNames,
# SchedulerType and AttentionInterface, TRL's DPOConfig/SFTConfig loss types). The lists are read from the
# libraries' source files, not imported: importing transformers.training_args costs seconds and pulls in
# bitsandbytes, which a run that does not use it keeps out of its process (alignment/runtime/optional.py). Where the source
# cannot be read that way the objects themselves are imported (tests/test_bad_input.py compares the two).
# ------------------------------------------------------------------------------------------------------------------


def _package_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) / relative if locations else None


@functools.lru_cache(maxsize=None)
def _source(package: str, relative: str) -> str:
    path = _package_file(package, relative)
    try:
        return path.read_text(encoding="utf-8") if path else ""
    except OSError:
        return ""


_BLOCK_END = re.compile(r"^[^\s#)\]}]", re.M)


@functools.lru_cache(maxsize=None)
def _top_level(package: str, relative: str, name: str) -> ast.stmt | None:
    """The top-level class, function or assignment `name` of a library module, parsed alone (fast), else None."""
    text = _source(package, relative)
    found = re.search(rf"^(?:class|def)\s+{re.escape(name)}\b|^{re.escape(name)}\s*[:=]", text, re.M)
    if not found:
        return None
    line_end = text.find("\n", found.start())
    end = _BLOCK_END.search(text, line_end + 1) if line_end >= 0 else None
    try:
        return ast.parse(text[found.start():end.start() if end else len(text)]).body[0]
    except SyntaxError:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            return None
        return next((node for node in tree.body if _defines(node, name)), None)


def _defines(node: ast.stmt, name: str) -> bool:
    if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
        return node.name == name
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return any(isinstance(t, ast.Name) and t.id == name for t in targets)


def _string_constants(node: ast.AST | None) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)] if node else []


def _enum_members(package: str, relative: str, class_name: str) -> dict[str, str]:
    """NAME → value of a string enum class (transformers' ExplicitEnum)."""
    node = _top_level(package, relative, class_name)
    if not isinstance(node, ast.ClassDef):
        return {}
    return {stmt.targets[0].id: stmt.value.value for stmt in node.body
            if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name)
            and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)}


def _class_field_metadata(package: str, relative: str, class_name: str, field_name: str) -> dict[str, Any]:
    """The `metadata={...}` of a dataclass field `name: T = field(...)`, literal values only."""
    node = _top_level(package, relative, class_name)
    for stmt in node.body if isinstance(node, ast.ClassDef) else []:
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == field_name
                and isinstance(stmt.value, ast.Call)):
            for keyword in stmt.value.keywords:
                if keyword.arg == "metadata":
                    try:
                        return ast.literal_eval(keyword.value)
                    except ValueError:
                        return {}
    return {}


@functools.lru_cache(maxsize=None)
def optimizer_names() -> tuple[str, ...]:
    """transformers' OptimizerNames: the values TrainingArguments(optim=...) accepts."""
    names = tuple(_enum_members("transformers", "training_args.py", "OptimizerNames").values())
    if names:
        return names
    from transformers.training_args import OptimizerNames

    return tuple(o.value for o in OptimizerNames)


@functools.lru_cache(maxsize=None)
def scheduler_names() -> tuple[str, ...]:
    """transformers' SchedulerType: the values TrainingArguments(lr_scheduler_type=...) accepts."""
    names = tuple(_enum_members("transformers", "trainer_utils.py", "SchedulerType").values())
    if names:
        return names
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)


@functools.lru_cache(maxsize=None)
def attention_names() -> tuple[str, ...]:
    """transformers' AttentionInterface registry, and eager (always there)."""
    node = _top_level("transformers", "modeling_utils.py", "AttentionInterface")
    mapping = next((stmt.value for stmt in (node.body if isinstance(node, ast.ClassDef) else [])
                    if _defines(stmt, "_global_mapping") and isinstance(stmt.value, ast.Dict)), None)
    names = [k.value for k in mapping.keys if isinstance(k, ast.Constant)] if mapping is not None else []
    if not names:
        from transformers.modeling_utils import AttentionInterface

        names = list(AttentionInterface._global_mapping)
    return ("eager", *names)


def _loss_types_from_help(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(re.findall(r"`'([a-z0-9_]+)'`", text)))


@functools.lru_cache(maxsize=None)
def loss_types(source: tuple[str, str]) -> tuple[str, ...]:
    """The loss types a TRL config class accepts: its loss_type field's `choices`, or those its help text lists
    (DPOConfig). source: (file under trl/, class name), from the stage's registry entry."""
    path, class_name = source
    metadata = _class_field_metadata("trl", path, class_name, "loss_type")
    found = tuple(metadata.get("choices", ())) or _loss_types_from_help(str(metadata.get("help", "")))
    if found:
        return found
    module = importlib.import_module("trl." + path.removesuffix(".py").replace("/", "."))
    field_metadata = getattr(module, class_name).__dataclass_fields__["loss_type"].metadata
    return tuple(field_metadata.get("choices", ())) or _loss_types_from_help(field_metadata.get("help", ""))


def _availability_package(function: str) -> str | None:
    """The package an `is_<x>_available` function of transformers looks for (its _is_package_available argument)."""
    node = _top_level("transformers", "utils/import_utils.py", function)
    for call in ast.walk(node) if node else []:
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "_is_package_available"
                and call.args and isinstance(call.args[0], ast.Constant)):
            return call.args[0].value
    return None


@functools.lru_cache(maxsize=None)
def optimizer_needs() -> dict[str, tuple[tuple[str, ...], bool]]:
    """Optimizer name → (the packages its transformers handler needs, whether it needs optim_target_modules), read
    from transformers/trainer_optimizer.py's dispatch table; {} where that table cannot be read."""
    members = _enum_members("transformers", "training_args.py", "OptimizerNames")

    def names(node: ast.AST) -> list[str]:  # OptimizerNames.X → its value
        return [members[n.attr] for n in ast.walk(node) if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name) and n.value.id == "OptimizerNames" and n.attr in members]

    table = _top_level("transformers", "trainer_optimizer.py", "_OPTIMIZER_HANDLERS")
    if table is None or not isinstance(getattr(table, "value", None), ast.Dict):
        return {}
    handlers: dict[str, str] = {}
    for key, value in zip(table.value.keys, table.value.values):
        if key is not None and isinstance(value, ast.Name):  # OptimizerNames.X: _get_x
            handlers.update(dict.fromkeys(names(key), value.id))
        elif key is None and isinstance(value, ast.Call) and len(value.args) == 2:  # **dict.fromkeys(_GROUP, _get_x)
            group, handler = value.args
            group_node = _top_level("transformers", "trainer_optimizer.py", getattr(group, "id", ""))
            if group_node is not None and isinstance(handler, ast.Name):
                handlers.update(dict.fromkeys(names(group_node), handler.id))
    needs = {}
    for handler in set(handlers.values()):
        node = _top_level("transformers", "trainer_optimizer.py", handler)
        packages = []
        for n in ast.walk(node) if node else []:
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and re.fullmatch(r"is_\w+_available", n.func.id):
                packages.append(_availability_package(n.func.id))
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                packages.append(n.module.split(".")[0])
        packages = tuple(dict.fromkeys(p for p in packages if p and p not in ("torch", "transformers")))
        low_rank = any(isinstance(n, ast.Name) and n.id == "_setup_low_rank_optimizer" for n in ast.walk(node)) \
            if node else False
        needs[handler] = (packages, low_rank)
    return {name: needs[handler] for name, handler in handlers.items()}


# Schedulers whose transformers function needs arguments alignment does not pass (lr_scheduler_kwargs), and those
# TrainingArguments accepts only with evaluation during training (tests/test_bad_input.py checks both lists against
# transformers).
SCHEDULERS_NEEDING_KWARGS = {"cosine_with_min_lr": "min_lr or min_lr_rate",
                             "cosine_warmup_with_min_lr": "min_lr or min_lr_rate",
                             "warmup_stable_decay": "num_decay_steps"}
SCHEDULERS_NEEDING_EVAL = ("reduce_lr_on_plateau", "greedy")
# Loss types TRL refuses unless a setting is given: (the setting, whether the value admits the loss type).
LOSS_TYPE_NEEDS = {"exo_pair": ("stage.label_smoothing > 0", lambda stage: getattr(stage, "label_smoothing", 0) > 0)}


def _has_eval_split(cfg: RunConfig) -> bool:
    return any(source.eval_split or source.test_size > 0 for source in cfg.dataset.sources)


def check_training_choices(cfg: RunConfig) -> None:
    """optim, lr_scheduler_type, loss_type, attention and padding side: values the libraries accept, usable here."""
    stage, described = cfg.stage, stage_of(cfg)
    if described.trains:
        _check_optimizer(stage.optim)
        _check_scheduler(cfg)
    if described.loss_types_from is not None:
        valid = loss_types(described.loss_types_from)
        require(stage.loss_type in valid, f"stage.loss_type={stage.loss_type} is not a loss type {described.trainer} "
                                          f"takes. Valid values: {', '.join(valid)}.")
        needs = LOSS_TYPE_NEEDS.get(stage.loss_type)
        require(needs is None or needs[1](stage), f"stage.loss_type={stage.loss_type} needs {needs and needs[0]} "
                                                  f"(TRL refuses it otherwise).")
    _check_attention(cfg)
    one_of("model.tokenizer.padding_side", cfg.model.tokenizer.padding_side, ("right", "left"))
    if cfg.backend.fsdp is not None:
        one_of("backend.fsdp.state_dict_type", cfg.backend.fsdp.state_dict_type,
                ("SHARDED_STATE_DICT", "FULL_STATE_DICT"))
    if cfg.backend.zero3 is not None:
        for part in ("optimizer", "param"):
            one_of(f"backend.zero3.offload_{part}", getattr(cfg.backend.zero3, f"offload_{part}"), ("none", "cpu"))


def _check_optimizer(optim: str) -> None:
    valid = optimizer_names()
    require(optim in valid, f"stage.optim={optim} is not an optimizer transformers knows. Valid values: "
                             f"{', '.join(valid)}.")
    packages, low_rank = optimizer_needs().get(optim, ((), False))
    require(not low_rank, f"stage.optim={optim} needs optim_target_modules, which alignment does not pass. Use "
                           f"another optimizer, e.g. stage.optim=adamw_torch_fused.")
    for package in packages:
        if package == "bitsandbytes":  # imported now, so that the run keeps it (alignment/runtime/optional.py hides it else)
            require_importable(package, f"stage.optim={optim} needs bitsandbytes",
                               "Install it (`pip install bitsandbytes`) or use stage.optim=adamw_torch_fused.")
        else:
            require(importlib.util.find_spec(package) is not None,
                     f"stage.optim={optim} needs the {package} package, which is not installed. Install it, or use "
                     f"stage.optim=adamw_torch_fused.")


def _check_scheduler(cfg: RunConfig) -> None:
    name = cfg.stage.lr_scheduler_type
    valid = scheduler_names()
    require(name in valid, f"stage.lr_scheduler_type={name} is not a scheduler transformers knows. Valid values: "
                            f"{', '.join(v for v in valid if v not in SCHEDULERS_NEEDING_KWARGS)}.")
    require(name not in SCHEDULERS_NEEDING_KWARGS,
             f"stage.lr_scheduler_type={name} needs {SCHEDULERS_NEEDING_KWARGS.get(name)} in lr_scheduler_kwargs, "
             f"which alignment does not pass. Use e.g. stage.lr_scheduler_type=cosine or linear.")
    require(name not in SCHEDULERS_NEEDING_EVAL or (cfg.stage.eval_steps is not None and _has_eval_split(cfg)),
             f"stage.lr_scheduler_type={name} steps on evaluation results, so it needs evaluation during training: "
             f"set stage.eval_steps and a dataset with an eval split (dataset.eval_split or dataset.test_size), or use "
             f"another scheduler, e.g. stage.lr_scheduler_type=cosine.")


def _check_attention(cfg: RunConfig) -> None:
    name = cfg.model.attn_implementation
    if "/" in name:  # a kernel from the hub (org/repo[:function]), which transformers loads with `kernels`
        require(importlib.util.find_spec("kernels") is not None,
                 f"model.attn_implementation={name} is a hub kernel, which needs the kernels package (`pip install "
                 f"kernels`). Or use model.attn_implementation=sdpa.")
        return
    valid = attention_names()
    require(name in valid, f"model.attn_implementation={name} is not an attention implementation transformers "
                            f"knows. Valid values: {', '.join(valid)} (or a hub kernel, org/repo).")
    # flash_attention_2 falls back to sdpa by itself (alignment/models/modeling.py); the newer kernels need CUDA.
    require(not name.startswith("flash_attention") or name == "flash_attention_2" or uses_cuda(cfg),
             f"model.attn_implementation={name} needs a CUDA device, and none is used here. Use "
             f"model.attn_implementation=sdpa (or flash_attention_2, which falls back to sdpa without CUDA).")
