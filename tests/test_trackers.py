"""tracker=wandb offline: the run's own files hold the reward metrics and the config, and no secret."""

from __future__ import annotations

import json
import struct

import pytest

from .conftest import run_cli

pytestmark = pytest.mark.slow

TOKEN = "hf_trackerSECRETvalue0987654321"
BLOCK = 32768


def wandb_records(path):
    """Records of a W&B transaction log (.wandb): a 7-byte file header, then LevelDB-log blocks of
    32 KiB whose records carry a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, offset, pending = [], 7, b""
    while offset + 7 <= len(data):
        room = BLOCK - offset % BLOCK
        if room < 7:
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        if length == 0 and kind == 0:
            offset += room
            continue
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_reward_metrics_and_the_masked_config(tmp_path):
    env = {"HF_TOKEN": TOKEN, "WANDB_API_KEY": "", "WANDB_MODE": "offline"}
    result = run_cli("stage=dpo", "tracker=wandb", "stage.max_steps=3", "stage.global_batch_size=8",
                     "stage.max_length=256", "stage.max_prompt_length=128", "dataset.eval_split=null",
                     f"run_dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1, "no API key: the run is kept offline in the run dir"
    records = wandb_records(offline[0])
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    steps = [h for h in history if "train/rewards/margins" in h]
    assert [h["train/global_step"] for h in steps] == [1, 2, 3]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["train/rewards/margins"] for h in steps] == pytest.approx([m["rewards/margins"] for m in metrics])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}  # ours, at wandb.init
    assert config["beta"] == 0.1 and config["stage"]["name"] == "dpo" and config["tracker"]["name"] == "wandb"
    assert config["stage"]["global_batch_size"] == 8 and config["model"]["name"] == "tiny_qwen2"
    assert list(run.tags) == ["dpo", "tiny_qwen2", "single"] and run.run_group == "run" and run.project == "alignment"
    leaked = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaked == []
