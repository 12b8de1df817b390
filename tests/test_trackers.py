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


def test_wandb_sweep_groups_members_and_keeps_a_dashboard_spec_offline(demo_run, tmp_path):
    from alignment.records.dashboard import build_workspace

    result = run_cli("--multirun", "stage=dpo", "tracker=wandb", "beta=0.1,0.5", "stage.max_steps=2",
                     f"parent_run={demo_run['dir'] / '1-sft'}", "stage.global_batch_size=8", "stage.max_length=256",
                     "stage.max_prompt_length=128", "dataset.eval_split=null", cwd=tmp_path,
                     env={"WANDB_API_KEY": "", "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = next((tmp_path / "outputs" / "sweeps").iterdir())
    spec = json.loads((sweep / "wandb_dashboard.json").read_text())
    assert spec["group"] == sweep.name and spec["group_by"] == ["beta"] and spec["x"] == "train/global_step"
    assert [p["title"] for p in spec["panels"]] == ["reward margins", "reward accuracies", "chosen vs rejected rewards",
                                                     "loss", "grad_norm", "learning rate"]
    assert "python -m alignment.records.dashboard publish" in result.stdout
    for member in ("0", "1"):
        records = wandb_records(next((sweep / member / "wandb").glob("offline-run-*/run-*.wandb")))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.run_group == sweep.name and run.display_name.startswith("stage=dpo tracker=wandb beta=")
    workspace = build_workspace(spec, entity="someone")  # the object publish() would save, built offline
    assert len(workspace.sections[0].panels) == 6


def test_tensorboard_writes_event_files_with_the_reward_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_cli("stage=dpo", "tracker=tensorboard", "stage.max_steps=3", "stage.global_batch_size=8",
                     "stage.max_length=256", "stage.max_prompt_length=128", "dataset.eval_split=null",
                     f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    margins = events.Scalars("train/rewards/margins")
    assert [e.step for e in margins] == [1, 2, 3]
