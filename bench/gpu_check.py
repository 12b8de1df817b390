"""The GPU check: DPO throughput, MFU and peak memory against the planner, per configuration, in one command.

    PYTHONPATH=/tmp/site:. python3 bench/gpu_check.py --out DIR [--only NAME[,NAME]] [--budget-s 420]
    python bench/gpu_check.py --toy --out DIR        # CPU, float32, the tiny twin, 2 steps a row (tests/test_gpu_check.py)

(on a GPU machine without the training stack, `bash bench/gpu_setup.sh` first installs the wheels carried in
.whl/ into /tmp/site.)

Every configuration is one `python -m alignment stage=dpo ... run_dir=<tmp>/<name>` in a fresh process (a clean
CUDA peak), on a Qwen2.5-0.5B-shaped twin: the real Qwen2ForCausalLM class, random weights, hidden 896, 24 layers,
14 query / 2 KV heads, intermediate 4864, vocabulary 151,936, tied embeddings, bfloat16 (`model=tiny_qwen2` with
`model.architecture.*` overrides). The data is `dataset=ragged_dpo` (preference pairs with a realistic spread of
lengths) when the repository has it, else `tiny_dpo` (the report says which). The script reads each run's
summary.json and writes DIR/gpu_check.json and DIR/gpu_check.md after every configuration, so a run cut short
still leaves what it measured. Configurations that cannot run here are `skipped` with the reason (no flash_attn,
no liger_kernel, fewer than 2 GPUs, the --budget-s running out, ...).

The matrix (one question each; `--only` picks rows by name):
  lora_length        the baseline: LoRA, length-aware batching (the default)
  lora_random        random batching: what length-aware batching buys (tokens/s, padding efficiency)
  lora_padding_free  stage.padding_free=true: rows packed without padding
  qlora_length       a 4-bit base (bitsandbytes nf4): its throughput cost and memory saving
  full_length        full fine-tuning (ref=auto: precomputed reference log-probs)
  lora_liger         stage.use_liger_kernel=true (needs liger_kernel and CUDA)
  lora_fa2           model.attn_implementation=flash_attention_2 (needs flash_attn and CUDA)
  fsdp_qlora, zero3_qlora   two processes, seed 000's QLoRA setting scaled to the twin; their per-step losses are
                     compared (max abs difference): needs 2 GPUs

Reported per configuration: status (ok / failed / skipped, with the reason), training seconds (the trainer's
loop), real (non-padding) tokens per second, padding efficiency (real / computed tokens), MFU, peak
torch.cuda.max_memory_allocated against the planner's prediction for the same run (alignment/plan/memory.py, bytes
per device) and their ratio, and the final logged loss.

MFU = FLOPs per real token × real tokens/s / (processes × the device's dense bf16 peak: H100 SXM and H200
989.5e12, H100 PCIe 756e12, A100 312e12; any other device and the CPU: n/a). FLOPs per real token, counting
matmuls only (norms, rotary, softmax, biases and the optimizer step are left out), with
  N   = the decoder layers' linear weights + vocab × hidden (the LM head, computed even when tied),
  N_a = the LoRA adapter parameters (r · (in + out) per targeted linear layer and decoder layer),
  A   = 4 · layers · (heads · head_dim) · s, attention's two matmuls (QKᵀ and AV) in one forward, where s is the
        mean real sequence length of the run (real tokens / sequences; the non-causal count, as PaLM's MFU does):
  policy, full fine-tuning:  6·N + 3·A           (forward 2·N; backward 4·N: input and weight gradients)
  policy, LoRA and QLoRA:    4·N + 6·N_a + 3·A   (the frozen base's backward needs input gradients only, 2·N;
                                                  the adapters take 2·N_a forward and 4·N_a backward; the 4-bit
                                                  dequantisation is not counted)
  + 2·N (+ 2·N_a) + A when gradient checkpointing recomputes the forward
  reference: 2·N + A, one forward, unless ref=precomputed (then computed before training, outside its seconds).
The result is an estimate of useful work: padding computed for nothing does not count, so better batching shows up
as higher MFU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python3 bench/gpu_check.py` from a checkout without an install
    sys.path.insert(0, str(REPO))

# Dense bf16 peak FLOP/s by device name (first match wins; checked in this order).
PEAK_BF16 = (("H100 PCIe", 756e12), ("H200", 989.5e12), ("H100", 989.5e12), ("A100", 312e12))

# Qwen2.5-0.5B's shape (its config.json), for the real Qwen2ForCausalLM class with random weights.
QWEN25_05B = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": "true",
              "max_position_embeddings": 32768}

GPU_SETTINGS = {"steps": 30, "batch": 8, "max_length": 1024, "max_prompt_length": 512, "learning_rate": 1e-5}
# The toy keeps the GPU run's length budget (no ragged row is dropped or shortened, so every single-process run
# trains the same rows) and makes it cheap with small batches.
TOY_SETTINGS = {"steps": 2, "batch": 4, "max_length": 1024, "max_prompt_length": 512, "learning_rate": 1e-3}


@dataclass(frozen=True)
class Config:
    name: str
    question: str
    peft: str = "lora"
    batching: str = "length"
    padding_free: bool = False
    liger: bool = False
    attention: str = "sdpa"
    backend: str = "single"
    processes: int = 1


MATRIX = (
    Config("lora_length", "baseline: LoRA, length-aware batching"),
    Config("lora_random", "random batching", batching="random"),
    Config("lora_padding_free", "padding-free rows", padding_free=True),
    Config("qlora_length", "4-bit base", peft="qlora"),
    Config("full_length", "full fine-tuning", peft="none"),
    Config("lora_liger", "Liger kernels", liger=True),
    Config("lora_fa2", "flash-attention 2", attention="flash_attention_2"),
    Config("fsdp_qlora", "FSDP + QLoRA, 2 processes", peft="qlora", backend="fsdp", processes=2),
    Config("zero3_qlora", "ZeRO-3 + QLoRA, 2 processes", peft="qlora", backend="zero3", processes=2),
)
PARITY = ("fsdp_qlora", "zero3_qlora")


@dataclass
class Row:
    name: str
    question: str
    status: str = "pending"            # ok | failed | skipped
    reason: Optional[str] = None
    command: Optional[str] = None
    attention: Optional[str] = None     # the implementation the run used (summary.json), after any fallback
    reference: Optional[str] = None
    checkpointing: Optional[bool] = None  # model.gradient_checkpointing as the run resolved it
    wall_seconds: Optional[float] = None
    train_seconds: Optional[float] = None
    steps: Optional[int] = None
    real_tokens: Optional[int] = None
    computed_tokens: Optional[int] = None
    real_tokens_per_second: Optional[float] = None
    padding_efficiency: Optional[float] = None
    flops_per_real_token: Optional[float] = None
    mfu: Optional[float] = None
    peak_allocated_bytes: Optional[int] = None
    peak_reserved_bytes: Optional[int] = None
    process_peak_allocated_bytes: Optional[int] = None  # the whole process (load, train, save), single-process runs
    planned_bytes: Optional[float] = None
    peak_over_planned: Optional[float] = None
    final_loss: Optional[float] = None
    losses: list[float] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)   # where each number came from (summary key or fallback)
    notes: list[str] = field(default_factory=list)
    log_tail: Optional[str] = None


# What the device and the environment offer, read in a child process so that this one never touches CUDA.
PROBE = r"""
import importlib, importlib.metadata as md, json, sys
out = {"versions": {}, "importable": {}}
for dist in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel",
             "flash-attn", "deepspeed", "hydra-core"):
    try:
        out["versions"][dist] = md.version(dist)
    except md.PackageNotFoundError:
        out["versions"][dist] = None
import torch
out["cuda"] = torch.cuda.is_available()
out["device_count"] = torch.cuda.device_count() if out["cuda"] else 0
out["device_name"] = torch.cuda.get_device_name(0) if out["cuda"] else None
out["device_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory if out["cuda"] else None
out["torch_cuda"] = torch.version.cuda
for module in ("flash_attn", "liger_kernel.transformers", "bitsandbytes", "deepspeed"):
    if module == "deepspeed":  # importing it is slow; only the two-process rows need it
        import importlib.util
        out["importable"][module] = None if importlib.util.find_spec(module) else "not installed"
        continue
    try:
        importlib.import_module(module)
        out["importable"][module] = None
    except Exception as err:
        out["importable"][module] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
out["bnb_4bit_cpu"] = None
if out["importable"]["bitsandbytes"] is None:
    try:
        import bitsandbytes.functional as F
        weight = torch.randn(128, 128)
        packed, state = F.quantize_4bit(weight, quant_type="nf4")
        assert (F.dequantize_4bit(packed, state) - weight).abs().mean() < 0.5
    except Exception as err:
        out["bnb_4bit_cpu"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
else:
    out["bnb_4bit_cpu"] = "bitsandbytes is not importable"
print("PROBE " + json.dumps(out))
"""

# Runs `python -m alignment` unchanged and, at exit, writes this process's CUDA peak: a second measurement beside
# summary.json's cuda_memory (and the only one where a summary does not record it).
PEAK_WRAPPER = r"""
import atexit, json, os, runpy, sys
def _peak():
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            with open(os.environ["GPU_CHECK_PEAK_FILE"], "w") as f:
                json.dump({"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}, f)
    except Exception:
        pass
atexit.register(_peak)
sys.argv[0] = "alignment"
runpy.run_module("alignment", run_name="__main__", alter_sys=True)
"""


def probe(env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300)
    for line in result.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    raise SystemExit(f"the environment probe failed:\n{result.stderr[-3000:]}")


def peak_flops(device_name: Optional[str]) -> Optional[float]:
    if not device_name:
        return None
    for key, value in PEAK_BF16:
        if key.lower() in device_name.lower():
            return value
    return None


def train_rows(dataset: str) -> Optional[int]:
    """Rows in the dataset option's packaged train split (a `${fixture:...}` path), or None when not local."""
    conf = REPO / "alignment" / "conf" / "dataset" / f"{dataset}.yaml"
    text = conf.read_text() if conf.exists() else ""
    path = re.search(r"^path:\s*\$\{fixture:([^}]+)\}", text, re.M)
    split = re.search(r"^train_split:\s*(\S+)", text, re.M)
    if not path or not split:
        return None
    rows = REPO / "alignment" / "fixtures" / path.group(1) / f"{split.group(1)}.jsonl"
    return sum(1 for line in rows.open() if line.strip()) if rows.exists() else None


def dataset_choice() -> tuple[str, Optional[str]]:
    if (REPO / "alignment" / "conf" / "dataset" / "ragged_dpo.yaml").exists():
        return "ragged_dpo", None
    return "tiny_dpo", ("dataset=ragged_dpo is not in this checkout (alignment/conf/dataset/ragged_dpo.yaml): fell "
                        "back to tiny_dpo, whose rows are short and alike, so batching and padding numbers say little")


def overrides_for(config: Config, settings: dict, toy: bool, dataset: str, available: Optional[int]) -> list[str]:
    """The command-line overrides of one configuration (without run_dir).

    A single-process run trains on exactly steps × batch rows (dataset.rows), one epoch, when the split has them:
    every batching strategy then sees the same rows and only their grouping differs."""
    two = config.processes > 1
    out = ["stage=dpo", "model=tiny_qwen2", f"peft={config.peft}", f"dataset={dataset}", "dataset.eval_split=null",
           f"stage.max_steps={settings['steps']}", f"stage.max_length={settings['max_length']}",
           f"stage.max_prompt_length={settings['max_prompt_length']}", "stage.save_steps=100000",
           "stage.eval_steps=null", "stage.logging_steps=1", "stage.warmup_ratio=0",
           f"model.attn_implementation={config.attention}",
           f"stage.batching={config.batching}"]
    if config.padding_free:
        out.append("stage.padding_free=true")
    if config.liger:
        out.append("stage.use_liger_kernel=true")
    if two:  # seed 000 (experiment=qwen72b_qlora_dpo), scaled to the twin: micro batch 1, accumulation, checkpointing
        out += [f"backend={config.backend}", f"launcher.num_processes={config.processes}", "seed=1234",
                "learning_rate=1e-5", "stage.per_device_train_batch_size=1",
                f"stage.global_batch_size={2 * settings['batch']}", "stage.optim=adamw_torch",
                "model.gradient_checkpointing=true"]
    else:
        out += [f"stage.per_device_train_batch_size={settings['batch']}",
                f"stage.global_batch_size={settings['batch']}", f"learning_rate={settings['learning_rate']}"]
        if available is not None and settings["steps"] * settings["batch"] <= available:
            out.append(f"dataset.rows={settings['steps'] * settings['batch']}")
    if toy:
        out += ["model.dtype=float32", "backend.device=cpu"]
    else:
        out += [f"model.architecture.{key}={value}" for key, value in QWEN25_05B.items()]
        out += ["model.dtype=bfloat16"]
    return out


NEW_SETTINGS = ("stage.batching=", "stage.padding_free=", "stage.use_liger_kernel=")


def planned_bytes(overrides: list[str], reference: Optional[str], checkpointing: Optional[bool],
                  cuda: bool) -> tuple[Optional[float], Optional[dict], str]:
    """The planner's per-device bytes for the run these overrides compose: (total, facts for the FLOP count, note).

    As the run plans itself (alignment/plan/gate.py run_plan): its reference option and resolved checkpointing (from
    its summary when given), in the dtype it trains in. A setting this checkout does not know yet is left out of the
    composition (and named in the note): the planner does not read it."""
    from alignment.errors import ConfigError
    from alignment.plan import memory
    from alignment.plan.resolved import plan_of
    from alignment.preflight.compose import compose_run_config

    note, cfg = "", None
    try:
        cfg = compose_run_config(overrides)
    except ConfigError as err:
        kept = [o for o in overrides if not o.startswith(NEW_SETTINGS)]
        try:
            cfg = compose_run_config(kept)
            note = (f"planned without {', '.join(o for o in overrides if o not in kept)} ({str(err)[:160]})")
        except ConfigError as err2:
            return None, None, f"could not compose for the planner: {err2}"
    resolved = plan_of(cfg)
    reference = reference or resolved.reference.option
    if checkpointing is None:
        checkpointing = getattr(resolved, "gradient_checkpointing", cfg.model.gradient_checkpointing)
    if hasattr(memory, "run_dtype"):
        dtype = memory.run_dtype(cfg, cuda)
    else:
        dtype = None if cuda else "float32"
    try:
        inputs = memory.plan_inputs(cfg, reference, dtype=dtype, checkpointing=bool(checkpointing))
    except TypeError:  # a planner from before model.gradient_checkpointing=auto
        inputs = memory.plan_inputs(cfg, reference, dtype=dtype)
    plan = memory.plan_memory(inputs)
    arch, groups = inputs.arch, inputs.groups
    facts = {"linear": groups.linear, "head": arch.vocab_size * arch.hidden_size,
             "adapters": memory.lora_parameter_count(groups, arch.num_hidden_layers, inputs.lora_r,
                                                     inputs.lora_targets) if inputs.peft != "none" else 0,
             "layers": arch.num_hidden_layers,
             "attention_width": arch.num_attention_heads * (arch.head_dim or arch.hidden_size // arch.num_attention_heads),
             "peft": inputs.peft, "reference": reference, "checkpointing": bool(inputs.checkpointing)}
    return plan.total, facts, note


def flops_per_token(facts: dict, mean_seq_len: float) -> float:
    """The docstring's formula."""
    n, n_a = facts["linear"] + facts["head"], facts["adapters"]
    attention = 4 * facts["layers"] * facts["attention_width"] * mean_seq_len
    if facts["peft"] == "none":
        policy = 6 * n + 3 * attention
    else:
        policy = 4 * n + 6 * n_a + 3 * attention
    if facts["checkpointing"]:
        policy += 2 * n + 2 * n_a + attention
    reference = 0.0 if facts["reference"] == "precomputed" else 2 * n + attention
    return policy + reference


def losses_of(run_dir: Path) -> list[float]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record and "train_runtime" not in record:
            out.append(float(record["loss"]))
    return out


def error_line(log_text: str) -> str:
    lines = [line for line in log_text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("alignment: error:") or "Error" in line.split(":")[0]:
            return line.strip()[:400]
    return lines[-1].strip()[:400] if lines else "no output"


def run_one(config: Config, overrides: list[str], work: Path, env: dict, timeout: float, cuda: bool,
            out: Path) -> tuple[Row, dict]:
    """One configuration in a fresh process; returns its row (measurements filled in later) and summary.json."""
    row = Row(config.name, config.question)
    run_dir = work / config.name
    args = [*overrides, f"run_dir={run_dir}"]
    row.command = "python -m alignment " + " ".join(args)
    peak_file = work / f"{config.name}.peak.json"
    if cuda and config.processes == 1:
        command = [sys.executable, "-c", PEAK_WRAPPER, *args]
    else:
        command = [sys.executable, "-m", "alignment", *args]
    log_path = work / f"{config.name}.log"
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, cwd=REPO, env={**env, "GPU_CHECK_PEAK_FILE": str(peak_file)},
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)  # the run's own process group (start_new_session)
            try:
                process.wait(timeout=5)  # a graceful stop would write a checkpoint nobody reads
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            returncode = None
    row.wall_seconds = round(time.perf_counter() - started, 1)
    log_text = log_path.read_text(errors="replace")
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / log_path.name).write_text(log_text[-200_000:])  # the run's console, beside the report
    summary = {}
    if (run_dir / "summary.json").exists():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except json.JSONDecodeError:
            pass
    if returncode is None:
        row.status, row.reason = "failed", f"budget: stopped after {row.wall_seconds:.0f} s (--budget-s)"
    elif returncode != 0:
        row.status = "failed"
        row.reason = f"exit {returncode}: {error_line(log_text)}"
    elif summary.get("status") not in ("finished", "trained"):
        row.status, row.reason = "failed", f"exit 0 but summary status {summary.get('status')!r}"
    else:
        row.status = "ok"
    if row.status != "ok":
        row.log_tail = log_text[-3000:]
    if peak_file.exists():
        summary["_wrapper_peak"] = json.loads(peak_file.read_text())
    row.losses = losses_of(run_dir)
    return row, summary


def measure(row: Row, summary: dict, settings: dict, processes: int) -> None:
    """Fill a row's measurements from summary.json: the new keys where present, the older ones otherwise."""
    batching = summary.get("batching") if isinstance(summary.get("batching"), dict) else {}
    throughput = summary.get("throughput") if isinstance(summary.get("throughput"), dict) else {}
    train = summary.get("train") or {}
    row.attention = summary.get("attention")
    row.reference = (summary.get("reference") or {}).get("option")
    row.steps = (summary.get("final_metrics") or {}).get("step")
    if throughput.get("train_seconds") is not None:
        row.train_seconds, row.sources["train_seconds"] = throughput["train_seconds"], "summary.throughput"
    elif train.get("train_runtime") is not None:
        row.train_seconds, row.sources["train_seconds"] = train["train_runtime"], "summary.train.train_runtime"
    if batching.get("real_tokens") is not None:
        row.real_tokens, row.sources["real_tokens"] = int(batching["real_tokens"]), "summary.batching"
        row.computed_tokens = batching.get("computed_tokens")
    elif summary.get("num_tokens"):
        row.real_tokens, row.sources["real_tokens"] = int(summary["num_tokens"]), "summary.num_tokens (TRL)"
    if throughput.get("real_tokens_per_second") is not None:
        row.real_tokens_per_second = throughput["real_tokens_per_second"]
        row.sources["real_tokens_per_second"] = "summary.throughput"
    elif row.real_tokens and row.train_seconds:
        row.real_tokens_per_second = row.real_tokens / row.train_seconds
        row.sources["real_tokens_per_second"] = "real_tokens / train_seconds"
    if batching.get("padding_efficiency") is not None:
        row.padding_efficiency = batching["padding_efficiency"]
        row.sources["padding_efficiency"] = "summary.batching"
    elif row.real_tokens and row.computed_tokens:
        row.padding_efficiency = row.real_tokens / row.computed_tokens
    cuda_memory = summary.get("cuda_memory")
    if isinstance(cuda_memory, dict) and cuda_memory.get("peak_allocated_bytes") is not None:
        row.peak_allocated_bytes = int(cuda_memory["peak_allocated_bytes"])
        row.peak_reserved_bytes = cuda_memory.get("peak_reserved_bytes")
        row.sources["peak_allocated_bytes"] = "summary.cuda_memory"
    if summary.get("_wrapper_peak"):
        row.process_peak_allocated_bytes = int(summary["_wrapper_peak"]["allocated"])
    if row.peak_allocated_bytes is None and summary.get("_wrapper_peak"):
        row.peak_allocated_bytes = int(summary["_wrapper_peak"]["allocated"])
        row.peak_reserved_bytes = int(summary["_wrapper_peak"]["reserved"])
        row.sources["peak_allocated_bytes"] = "torch.cuda.max_memory_allocated at process exit"
    plan = summary.get("plan") if isinstance(summary.get("plan"), dict) else {}
    for gate, where in ((summary.get("memory_gate"), "summary.memory_gate"),
                        (plan.get("memory_gate"), "summary.plan.memory_gate")):
        if isinstance(gate, dict) and gate.get("planned_bytes_per_device") and row.planned_bytes is None:
            row.planned_bytes, row.sources["planned_bytes"] = float(gate["planned_bytes_per_device"]), where
    if isinstance(plan.get("gradient_checkpointing"), bool):
        row.checkpointing = plan["gradient_checkpointing"]
    if row.losses:
        row.final_loss = row.losses[-1]
    elif (summary.get("final_metrics") or {}).get("loss") is not None:
        row.final_loss = summary["final_metrics"]["loss"]


def finish_row(row: Row, facts: Optional[dict], settings: dict, processes: int, peak: Optional[float]) -> None:
    if row.planned_bytes and row.peak_allocated_bytes:
        row.peak_over_planned = row.peak_allocated_bytes / row.planned_bytes
    if facts and row.real_tokens and row.steps:
        global_batch = settings["batch"] * (2 if processes > 1 else 1)
        sequences = 2 * global_batch * row.steps  # chosen and rejected
        row.flops_per_real_token = flops_per_token(facts, row.real_tokens / sequences)
        if peak and row.real_tokens_per_second:
            row.mfu = row.flops_per_real_token * row.real_tokens_per_second / (peak * processes)


def skip_reason(config: Config, env_info: dict, toy: bool) -> Optional[str]:
    cuda = env_info["cuda"] and not toy
    usable = env_info["importable"]
    if config.processes > 1:
        if not cuda or env_info["device_count"] < config.processes:
            return f"needs {config.processes} GPUs"
        if config.backend == "zero3" and usable.get("deepspeed"):
            return f"deepspeed is not importable ({usable['deepspeed']})"
    if config.peft == "qlora":
        if usable.get("bitsandbytes"):
            return f"bitsandbytes is not importable ({usable['bitsandbytes']})"
        if not cuda and env_info.get("bnb_4bit_cpu"):
            return f"bitsandbytes 4-bit does not work on this CPU ({env_info['bnb_4bit_cpu']})"
    if config.liger:
        if usable.get("liger_kernel.transformers"):
            return f"liger_kernel is not importable ({usable['liger_kernel.transformers']})"
        if not cuda:
            return "liger kernels are Triton kernels: need a CUDA device"
    if config.attention == "flash_attention_2":
        if not cuda:
            return "flash_attention_2 needs a CUDA device"
        if usable.get("flash_attn"):
            return f"flash_attn is not importable ({usable['flash_attn']})"
    return None


# How each kind of number is printed in the report.
FORMATS = {"s": "{:.1f}".format, "tok": "{:,.0f}".format, "frac": "{:.3f}".format, "ratio": "{:.2f}".format,
           "loss": "{:.4f}".format, "pct": lambda v: f"{100 * v:.1f}%", "gb": lambda v: f"{v / 1e9:.2f} GB"}


def fmt(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    return FORMATS.get(kind, str)(value)


COLUMNS = ("config", "status", "train s", "real tok/s", "padding eff.", "MFU", "peak alloc", "planned",
           "peak/planned", "final loss", "note")


def table_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for row in rows:
        note = row.reason or ""
        if row.status == "ok":
            extra = [n for n in row.notes]
            if row.attention:
                extra.insert(0, f"attention {row.attention}")
            note = "; ".join(extra)
        out.append([row.name, row.status, fmt(row.train_seconds, "s"), fmt(row.real_tokens_per_second, "tok"),
                    fmt(row.padding_efficiency, "frac"), fmt(row.mfu, "pct"), fmt(row.peak_allocated_bytes, "gb"),
                    fmt(row.planned_bytes, "gb"), fmt(row.peak_over_planned, "ratio"), fmt(row.final_loss, "loss"),
                    note.replace("|", "/")])
    return out


def markdown(report: dict, rows: list[Row]) -> str:
    env_info, head = report["environment"], report["header"]
    versions = ", ".join(f"{k} {v}" for k, v in env_info["versions"].items() if v)
    lines = [f"# GPU check ({'toy, CPU' if head['toy'] else head['device'] or 'no CUDA device'})", "",
             f"**Command:** `{head['command']}`", "",
             f"**Machine:** {head['machine']}; {head['device'] or 'no GPU'}; {versions}. **Date:** {head['date']}.", "",
             f"**Setup:** DPO on {head['model']}, dataset `{head['dataset']}`, {head['steps']} steps, micro batch "
             f"{head['batch']} pairs (global batch {head['batch']}), max_length {head['max_length']}, "
             + (f"the same {head['rows_per_run']} rows in every single-process run (one epoch), "
                if head.get("rows_per_run") else "")
             + f"{head['dtype']}. MFU against "
               + (f"{head['peak_flops'] / 1e12:g} TFLOP/s (dense bf16)" if head["peak_flops"] else "n/a")
               + "; FLOPs per real token as in bench/gpu_check.py's docstring.", ""]
    if head.get("dataset_note"):
        lines += [f"**Note:** {head['dataset_note']}", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    parity = report.get("parity") or {}
    lines += ["", "**FSDP vs ZeRO-3 (QLoRA, 2 processes) per-step loss parity:** "
                  + (f"max abs difference {parity['max_abs_loss_difference']:.3g} over {parity['steps']} steps"
                     if parity.get("max_abs_loss_difference") is not None else f"n/a ({parity.get('reason')})"), ""]
    lines += ["The planner plans every sequence at max_length (its worst case); ragged batches are shorter, so "
              "peak/planned below 1 is expected for them.", "",
              f"Elapsed {report['elapsed_seconds']:.0f} s of a {head['budget_s']:.0f} s budget."]
    return "\n".join(lines) + "\n"


def print_table(rows: list[Row]) -> None:
    cells = [list(COLUMNS), *table_rows(rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS) - 1)]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def write_report(out: Path, report: dict, rows: list[Row]) -> None:
    report["rows"] = [asdict(r) for r in rows]
    for name, text in (("gpu_check.json", json.dumps(report, indent=2, default=str)),
                       ("gpu_check.md", markdown(report, rows))):
        temporary = out / f".{name}.tmp"
        temporary.write_text(text)
        temporary.replace(out / name)


def parity_of(rows: dict[str, Row]) -> dict:
    a, b = rows.get(PARITY[0]), rows.get(PARITY[1])
    if a is None or b is None:
        return {"reason": "not selected (--only)"}
    if a.status != "ok" or b.status != "ok":
        return {"reason": "; ".join(f"{r.name} {r.status}: {r.reason}" for r in (a, b) if r.status != "ok")}
    steps = min(len(a.losses), len(b.losses))
    if not steps:
        return {"reason": "no logged losses"}
    return {"steps": steps, "max_abs_loss_difference": max(abs(x - y) for x, y in zip(a.losses, b.losses)),
            "losses": {a.name: a.losses, b.name: b.losses}}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--toy", action="store_true",
                        help="CPU, float32, the tiny twin (tiny_qwen2 defaults), a few steps: the test suite's run")
    parser.add_argument("--only", default=None, help="comma-separated configuration names: " +
                        ", ".join(c.name for c in MATRIX))
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="whole-run wall budget; configurations that do not fit are skipped (reason: budget)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per configuration")
    parser.add_argument("--work", type=Path, default=None,
                        help="where run dirs and the alignment cache go, kept afterwards (default: a temporary "
                             "directory, removed at the end; the runs' consoles stay in OUT/logs)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    configs = list(MATRIX)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in {c.name for c in MATRIX}]
        if unknown:
            parser.error(f"unknown configuration(s) {', '.join(unknown)}; known: "
                         f"{', '.join(c.name for c in MATRIX)}")
        configs = [c for c in MATRIX if c.name in wanted]
    settings = dict(TOY_SETTINGS if args.toy else GPU_SETTINGS)
    if args.steps:
        settings["steps"] = args.steps

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    # Subprocesses: offline, a cache of their own, and this PYTHONPATH (made absolute) with the checkout on it.
    python_path = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "WANDB_MODE": "disabled", "ALIGNMENT_CACHE": str(work / "cache"), "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([*python_path, *([str(REPO)] if str(REPO) not in python_path else [])])}
    if args.toy:
        env["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "ALIGNMENT_CACHE")})

    env_info = probe(env)
    cuda = bool(env_info["cuda"]) and not args.toy
    if not args.toy and not cuda:
        print("gpu_check: no CUDA device here; use --toy for the CPU run", file=sys.stderr)
        return 2
    device = env_info["device_name"] if cuda else None
    peak = peak_flops(device) if cuda else None
    dataset, dataset_note = dataset_choice()
    available = train_rows(dataset)
    header = {
        "command": "python bench/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "device": (f"{device} × {env_info['device_count']}" if cuda else None),
        "peak_flops": peak, "toy": args.toy, "dataset": dataset, "dataset_note": dataset_note,
        "model": ("tiny_qwen2 (defaults)" if args.toy else
                  "Qwen2.5-0.5B-shaped twin (Qwen2ForCausalLM, random weights, tied embeddings)"),
        "dtype": "float32" if args.toy else "bfloat16", "budget_s": args.budget_s, **settings,
        "work_dir": str(work),
        "rows_per_run": (settings["steps"] * settings["batch"]
                         if available is not None and settings["steps"] * settings["batch"] <= available else None),
    }
    report: dict[str, Any] = {"header": header, "environment": env_info, "settings": settings}
    rows: list[Row] = [Row(c.name, c.question) for c in configs]
    by_name = {r.name: r for r in rows}
    if dataset_note:
        print(f"gpu_check: {dataset_note}", flush=True)
    print(f"gpu_check: {header['device'] or 'CPU (toy)'}; {len(configs)} configurations; work dir {work}", flush=True)
    minimum = 15.0 if args.toy else 45.0  # a configuration needs at least this much of the budget to start
    for config, row in zip(configs, rows):
        overrides = overrides_for(config, settings, args.toy, dataset, available)
        reason = skip_reason(config, env_info, args.toy)
        remaining = args.budget_s - (time.perf_counter() - started)
        if reason is None and remaining < minimum:
            reason = f"budget: {max(remaining, 0):.0f} s left of --budget-s {args.budget_s:.0f}"
        if reason is not None:
            row.status, row.reason = "skipped", reason
            row.command = "python -m alignment " + " ".join(overrides)
        else:
            print(f"gpu_check: {config.name} ({config.question}) ...", flush=True)
            measured, summary = run_one(config, overrides, work, env, remaining, cuda, args.out)
            measure(measured, summary, settings, config.processes)
            if measured.status == "ok" and config.attention != "sdpa" and measured.attention != config.attention:
                measured.notes.append(f"asked for {config.attention}, ran {measured.attention}")
            try:  # the planner's total (when the summary has none) and the facts the FLOP count needs
                total, facts, note = planned_bytes(overrides, measured.reference, measured.checkpointing, cuda)
            except Exception as err:  # the planner is reported, never fatal to the check
                total, facts, note = None, None, f"planner failed: {type(err).__name__}: {err}"
            if measured.planned_bytes is None and total is not None:
                measured.planned_bytes = total
                measured.sources["planned_bytes"] = "plan_memory(plan_inputs(cfg, reference, run dtype))"
            elif measured.planned_bytes and total and abs(total / measured.planned_bytes - 1) > 0.01:
                measured.notes.append(f"this script's plan {total / 1e9:.2f} GB differs from the run's")
            if note:
                measured.notes.append(note)
            finish_row(measured, facts, settings, config.processes, peak)
            rows[rows.index(row)] = by_name[config.name] = row = measured
            print(f"gpu_check: {config.name}: {row.status}" + (f" ({row.reason})" if row.reason else "") +
                  f", {row.wall_seconds:.0f} s", flush=True)
        report["parity"] = parity_of(by_name)
        report["elapsed_seconds"] = round(time.perf_counter() - started, 1)
        write_report(args.out, report, rows)
    print()
    print_table(rows)
    parity = report["parity"]
    print("\nFSDP vs ZeRO-3 loss parity: " + (f"max abs difference {parity['max_abs_loss_difference']:.3g} over "
                                              f"{parity['steps']} steps" if "steps" in parity else
                                              f"n/a ({parity['reason']})"))
    print(f"\nwritten: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'} "
          f"({report['elapsed_seconds']:.0f} s)")
    if args.work is None:  # twins, prepared data and saved models: gigabytes on a GPU run
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
