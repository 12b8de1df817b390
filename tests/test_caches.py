"""Shared caches: runs started together build each entry once; corrupted entries are rebuilt, never trained on."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from alignment.records import cache
from alignment.preflight.compose import compose_run_config

from .conftest import SHORT_DPO, train

CONCURRENT_RUN = ["stage=dpo", "ref=precomputed", "stage.max_steps=1", "stage.max_length=128",
                  "stage.max_prompt_length=64", "stage.per_device_train_batch_size=4", "stage.global_batch_size=4",
                  "stage.eval_steps=null", "learning_rate=1e-3"]


def _builds(cache_dir: Path) -> list[dict]:
    path = cache_dir / cache.BUILD_LOG
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _start(run_dir: Path, cache_dir: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "ALIGNMENT_CACHE": str(cache_dir)}
    log = (run_dir.parent / f"{run_dir.name}.console").open("w")
    return subprocess.Popen([sys.executable, "-m", "alignment", *CONCURRENT_RUN, f"run_dir={run_dir}"],
                            cwd=run_dir.parent, env=env, stdout=log, stderr=subprocess.STDOUT, **popen)


def _result(run_dir: Path) -> tuple[list, dict]:
    """What must be bit-identical between runs: every logged value, and every trained weight."""
    from safetensors.torch import load_file

    records = [{k: v for k, v in r.items() if "runtime" not in k and "per_second" not in k}
               for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    return records, load_file(str(run_dir / "model" / "model.safetensors"))


def _same(a: tuple[list, dict], b: tuple[list, dict]) -> bool:
    import torch

    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.slow
def test_runs_started_together_on_an_empty_cache_build_each_entry_once_and_match_a_lone_run(tmp_path):
    lone_dir = tmp_path / "lone"
    lone_dir.mkdir()
    lone = _start(lone_dir / "run", tmp_path / "lone-cache")
    assert lone.wait(timeout=600) == 0, (lone_dir / "run.console").read_text()[-3000:]
    expected = _result(lone_dir / "run")
    kinds = Counter(b["kind"] for b in _builds(tmp_path / "lone-cache"))
    assert {"tiny twin", "prepared data", "tokenized data", "reference log-probs"} <= kinds.keys(), kinds

    for round_number, processes in enumerate([2, 3] * 3):
        where, shared = tmp_path / f"round{round_number}", tmp_path / f"cache{round_number}"
        where.mkdir()
        started = [_start(where / f"run{i}", shared) for i in range(processes)]
        codes = [p.wait(timeout=600) for p in started]
        assert codes == [0] * processes, [(where / f"run{i}.console").read_text()[-3000:] for i in range(processes)]
        builds = Counter(b["entry"] for b in _builds(shared))
        assert builds and set(builds.values()) == {1}, f"round {round_number}: entries built more than once: {builds}"
        # TRL's filter after tokenizing hashes its whole DPOConfig (run dir included) into its datasets fingerprint,
        # so each run adds its own small filtered index file; every other entry is the lone run's, built once.
        shared_kinds = Counter(b["kind"] for b in _builds(shared) if b["kind"] != "tokenized data")
        assert shared_kinds == Counter({k: n for k, n in kinds.items() if k != "tokenized data"})
        for i in range(processes):
            assert _same(_result(where / f"run{i}"), expected), f"round {round_number}, run {i} differs from the lone run"
        shutil.rmtree(shared)


# Run as another user (uid 65534, group 0): everything a run reading the shared cache does to it.
_COLLEAGUE = """
import fcntl, hashlib, json, os, sys
from pathlib import Path
root, verified, locked = Path(sys.argv[1]), 0, 0
for manifest in list(root.rglob("MANIFEST.json")) + list(root.rglob("DERIVED.json")):
    for relative, expected in json.loads(manifest.read_text())["files"].items():
        data = (manifest.parent / relative).read_bytes()
        assert hashlib.sha256(data).hexdigest() == expected["sha256"], relative
        verified += 1
for lock in root.rglob(".*.lock"):
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    locked += 1
print(verified, locked)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not Path("/usr/bin/python3").exists(),
                    reason="switching users needs root (and a Python outside root's home)")
def test_a_cache_built_by_one_user_is_readable_and_lockable_by_another_member_of_the_group(tmp_path):
    shared_root = Path(tempfile.mkdtemp(prefix="alignment-team-", dir="/tmp"))
    try:
        shared_root.chmod(0o775)  # a team dir of group 0 (root's)
        cache_dir = shared_root / "cache"
        (shared_root / "builder").mkdir()
        builder = _start(shared_root / "builder" / "run", cache_dir, preexec_fn=lambda: os.umask(0o002))
        assert builder.wait(timeout=600) == 0, (shared_root / "builder" / "run.console").read_text()[-3000:]
        for path in [cache_dir, *cache_dir.rglob("*")]:
            assert cache.is_group_readable(path), f"{path} is not group-readable ({oct(path.stat().st_mode)})"
        colleague = subprocess.run(["/usr/bin/python3", "-c", _COLLEAGUE, str(cache_dir)], user=65534, group=0,
                                   extra_groups=[], capture_output=True, text=True, timeout=120)
        assert colleague.returncode == 0, colleague.stderr[-3000:]
        verified, locked = map(int, colleague.stdout.split())
        assert verified >= 10 and locked >= 2, colleague.stdout  # the twin's and the data's
    finally:
        shutil.rmtree(shared_root, ignore_errors=True)


# ----------------------------------------------------------------------------- corruption


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = os.urandom(64)
    path.write_bytes(bytes(data))


def _shift_arrow(path: Path, columns: tuple[str, ...], shift: float) -> None:
    """Plausibly wrong: the same schema and row count, every value of `columns` moved (an arrow file rewritten)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    for name in columns:
        index = table.schema.get_field_index(name)
        shifted = pa.array([v + shift for v in table.column(name).to_pylist()], type=table.schema.field(name).type)
        table = table.set_column(index, table.schema.field(name), shifted)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    path.write_bytes(sink.getvalue().to_pybytes())


def _scale_weights(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file({k: v * 1000 for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


CORRUPTIONS = {"truncated": _truncate, "garbled": _garble}


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("ALIGNMENT_CACHE", str(cache_dir))
    return cache_dir


@pytest.mark.parametrize("corruption", ["truncated", "garbled", "scaled"])
def test_a_corrupted_tiny_twin_is_rebuilt_to_the_same_weights(own_cache, corruption):
    from alignment.models.tiny import ensure_tiny_model

    cfg = compose_run_config([])
    entry = ensure_tiny_model(cfg.model, cfg.seed)
    weights = entry / "model.safetensors"
    original = cache.sha256(weights)
    (_scale_weights if corruption == "scaled" else CORRUPTIONS[corruption])(weights)
    assert cache.entry_problem(entry) is not None
    assert ensure_tiny_model(cfg.model, cfg.seed) == entry
    assert cache.sha256(weights) == original
    assert [b["kind"] for b in _builds(own_cache)] == ["tiny twin", "tiny twin"]


def test_an_interrupted_entry_without_manifest_is_rebuilt(own_cache):
    from alignment.models.tiny import ensure_tiny_model

    cfg = compose_run_config([])
    entry = ensure_tiny_model(cfg.model, cfg.seed)
    (entry / cache.MANIFEST).unlink()
    assert "has no MANIFEST.json" in cache.entry_problem(entry)
    ensure_tiny_model(cfg.model, cfg.seed)
    assert cache.entry_problem(entry) is None and len(_builds(own_cache)) == 2


@pytest.mark.parametrize("corruption", ["truncated", "garbled", "swapped"])
def test_corrupted_prepared_data_is_rebuilt_and_its_rows_are_the_original_ones(own_cache, tiny_tokenizer, corruption):
    from alignment.data import prepare

    cfg = compose_run_config(["stage=dpo"])
    first = prepare(cfg, tiny_tokenizer)
    rows = first.train.to_list()
    arrow = next((first.location / "train").glob("data-*.arrow"))
    del first
    if corruption == "swapped":  # plausibly wrong: chosen and rejected exchanged, same schema and size
        import pyarrow as pa

        with pa.memory_map(str(arrow)) as source:
            table = pa.ipc.open_stream(source).read_all()
        swapped = table.rename_columns([{"chosen": "rejected", "rejected": "chosen"}.get(n, n)
                                        for n in table.column_names]).select(table.column_names)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(swapped.cast(table.schema))
        arrow.write_bytes(sink.getvalue().to_pybytes())
    else:
        CORRUPTIONS[corruption](arrow)
    again = prepare(cfg, tiny_tokenizer)
    assert again.train.to_list() == rows
    assert [b["kind"] for b in _builds(own_cache) if b["kind"] == "prepared data"] == ["prepared data"] * 2


def test_an_entry_that_cannot_be_rebuilt_is_refused_with_its_name_and_how_to_clear_it(own_cache, monkeypatch):
    from alignment.models.tiny import ensure_tiny_model

    cfg = compose_run_config([])
    entry = ensure_tiny_model(cfg.model, cfg.seed)
    _garble(entry / "model.safetensors")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(cache, "_discard", read_only)
    with pytest.raises(cache.CacheEntryError) as refused:
        ensure_tiny_model(cfg.model, cfg.seed)
    message = str(refused.value)
    assert str(entry) in message and f"rm -rf {entry}" in message and "does not match its manifest" in message


REFERENCE_RUN = [*SHORT_DPO, "ref=precomputed"]


def _derived_files(entry: Path, kind: str, builds: list[dict]) -> list[Path]:
    return [Path(b["entry"]) for b in builds if b["kind"] == kind]


@pytest.mark.slow
def test_corrupted_tokenized_data_and_reference_log_probs_are_computed_again_never_trained_on(own_cache, tmp_path):
    clean = train(tmp_path, "clean", *REFERENCE_RUN)
    expected = [r["loss"] for r in map(json.loads, (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]
    assert expected[0] == pytest.approx(math.log(2), abs=1e-4)  # the reference is the starting policy
    builds = _builds(own_cache)
    reference_file = Path(clean.summary["reference"]["caches"]["train"])  # the file TRL reads the log-probs from
    tokenized_files = [p for p in _derived_files(own_cache, "tokenized data", builds) if "/train/" in str(p)]
    assert reference_file in _derived_files(own_cache, "reference log-probs", builds) and tokenized_files

    cases = [(f"reference-{name}", reference_file, damage) for name, damage in CORRUPTIONS.items()]
    cases.append(("reference-shifted", reference_file,
                  lambda p: _shift_arrow(p, ("ref_chosen_logps",), 1.0)))  # every chosen log-prob off by 1 nat
    # The tokenized rows themselves: the largest file. (TRL's filter after tokenization writes a small indices file
    # whose name hashes the whole DPOConfig, run dir included, so each run writes its own; only the tokenized rows'
    # name is the same from run to run, so only damage to them reaches the next run.)
    tokenized = max(tokenized_files, key=lambda p: p.stat().st_size)
    cases += [(f"tokenized-{name}", tokenized, damage) for name, damage in CORRUPTIONS.items()]
    for name, path, damage in cases:
        assert path.exists(), (name, sorted(p.name for p in path.parent.glob("cache-*")), _builds(own_cache))
        damage(path)
        before = len(_builds(own_cache))
        outcome = train(tmp_path, name, *REFERENCE_RUN)
        losses = [r["loss"] for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                  if "loss" in r]
        assert losses == expected, f"{name}: trained on a corrupted cache"
        assert len(_builds(own_cache)) > before, f"{name}: nothing was rebuilt"
        if name.startswith("reference"):
            assert outcome.summary["reference"]["reused"] is False
