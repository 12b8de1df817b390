"""Presets traceable to their sources: recipes/sources.yaml lists, for each Zephyr preset, every value it takes and
where from; each composed value must equal the table's, and nothing the preset file sets may be missing there."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alignment.preflight.compose import CONF_DIR, compose_run_config
from alignment.config.schema import as_dict, flatten

from .conftest import REPO

TABLE = yaml.safe_load((REPO / "recipes" / "sources.yaml").read_text())
PRESETS = sorted(TABLE["presets"])
# Group choices a preset makes, and the values they bring, are listed by those values (model.name_or_path, ...).
NOT_VALUES = {"experiment", "chain", "defaults"}


def _preset_keys(preset: str) -> set[str]:
    """The dotted keys a preset file sets itself."""
    document = yaml.safe_load((CONF_DIR / "experiment" / f"{preset}.yaml").read_text())
    return {key for key in flatten({k: v for k, v in document.items() if k not in NOT_VALUES})}


def test_the_table_covers_every_preset_of_a_source():
    """Every preset but the chains (zephyr, zephyr_handbook) and the tiny demo is in the table."""
    presets = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")} - {"zephyr", "zephyr_handbook", "demo"}
    assert presets == set(PRESETS)


def _differences(preset: str, composed: dict) -> dict:
    entry = TABLE["presets"][preset]
    listed = {**entry["values"], **entry.get("ours", {})}
    return {key: (composed.get(key, "<absent>"), value) for key, (value, _source) in listed.items()
            if composed.get(key, "<absent>") != value}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_value_of_the_preset_is_its_sources(preset):
    entry = TABLE["presets"][preset]
    composed = flatten(as_dict(compose_run_config([f"experiment={preset}"])))
    assert not _differences(preset, composed), f"{preset}: composed vs source: {_differences(preset, composed)}"
    unsourced = _preset_keys(preset) - set(entry["values"]) - set(entry.get("ours", {}))
    assert not unsourced, f"{preset} sets {sorted(unsourced)} without a source in recipes/sources.yaml"
    for key, (_value, source) in entry["values"].items():
        assert source.split()[0].rstrip(";") in TABLE["sources"] or source.startswith(("see differs", "the dSFT")), \
            f"{preset} {key}: source {source!r} names no listed source"


def test_paper_and_handbook_presets_differ_where_their_sources_do():
    """Both kept, and told apart: the handbook changed DPO's beta, epochs, schedule and batch in f0ffa0d."""
    paper, handbook = (compose_run_config([f"experiment=zephyr_ddpo_{which}"]) for which in ("paper", "handbook"))
    assert (paper.beta, paper.stage.num_train_epochs, paper.stage.lr_scheduler_type, paper.stage.global_batch_size) \
        == (0.1, 3, "linear", 32)
    assert (handbook.beta, handbook.stage.num_train_epochs, handbook.stage.lr_scheduler_type,
            handbook.stage.global_batch_size) == (0.01, 1, "cosine", 128)
    sft_paper, sft_handbook = (compose_run_config([f"experiment=zephyr_dsft_{which}"]) for which in ("paper", "handbook"))
    assert (sft_paper.stage.global_batch_size, sft_paper.stage.packing) == (512, True)
    assert (sft_handbook.stage.global_batch_size, sft_handbook.stage.packing) == (128, False)


def test_a_value_that_drifts_from_its_source_is_caught():
    """The comparison can fail: one value moved off the source (beta 0.01 → 0.02) is reported by key."""
    composed = flatten(as_dict(compose_run_config(["experiment=zephyr_ddpo_handbook", "beta=0.02"])))
    assert _differences("zephyr_ddpo_handbook", composed) == {"beta": (0.02, 0.01)}
