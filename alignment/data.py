"""Load a dataset source and convert it into the conversational formats TRL 1.x trains on.

- chat (ultrachat_200k schema): `messages` → TRL's conversational language-modeling format.
- preference (ultrafeedback_binarized schema): full `chosen`/`rejected` conversations → conversational
  prompt/chosen/rejected, where the prompt is the shared leading turns and chosen/rejected are the final
  assistant turns. TRL then applies the chat template and splits prompt from completion itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import ConfigError, DatasetConfig
from .sources import in_hub_cache, looks_local

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = {
    "chat": ("messages",),
    "preference": ("chosen", "rejected"),
}


def check_source(dataset: DatasetConfig, offline: bool) -> None:
    """Cheap checks that need no loading: a local path exists; a hub id is usable offline."""
    if looks_local(dataset.path):
        if not Path(dataset.path).expanduser().exists():
            raise ConfigError(f"dataset.path={dataset.path} does not exist. Point it at a local directory of "
                              f"<split>.jsonl files, or use a hub dataset id.")
        return
    if offline and not in_hub_cache(dataset.path, "dataset"):
        raise ConfigError(
            f"dataset.path={dataset.path} is a hub id, the run is offline and no local copy is cached. "
            f"Download it on a connected machine (`huggingface-cli download --repo-type dataset {dataset.path}`), "
            f"or set dataset.path to a local directory, or use dataset=tiny_sft / dataset=tiny_dpo."
        )


def _load_split(dataset: DatasetConfig, split: str, max_rows: int | None):
    from datasets import load_dataset

    local = Path(dataset.path).expanduser()
    if local.is_dir():
        file = local / f"{split}.jsonl"
        if not file.exists():
            available = sorted(p.stem for p in local.glob("*.jsonl"))
            raise ConfigError(f"dataset split {split!r} not found in {local} (available: {', '.join(available)}).")
        data = load_dataset("json", data_files={split: str(file)}, split=split)
    else:
        data = load_dataset(dataset.path, split=split)
    missing = [c for c in REQUIRED_COLUMNS[dataset.format] if c not in data.column_names]
    if missing:
        raise ConfigError(
            f"dataset {dataset.name} split {split!r} has no column(s) {', '.join(missing)}; a {dataset.format} "
            f"dataset needs {', '.join(REQUIRED_COLUMNS[dataset.format])} (found: {', '.join(data.column_names)})."
        )
    if max_rows is not None:
        data = data.select(range(min(max_rows, len(data))))
    return data


def _chat(row: dict) -> dict:
    return {"messages": row["messages"]}


def _preference(row: dict) -> dict:
    chosen, rejected = row["chosen"], row["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def load_splits(dataset: DatasetConfig):
    """(train, eval or None), converted to TRL's conversational format (the trainer shuffles by seed)."""
    convert = _chat if dataset.format == "chat" else _preference
    splits = []
    for split, max_rows in ((dataset.train_split, dataset.max_train_rows), (dataset.eval_split, dataset.max_eval_rows)):
        if split is None:
            splits.append(None)
            continue
        data = _load_split(dataset, split, max_rows)
        data = data.map(convert, remove_columns=data.column_names, desc=f"formatting {split}")
        splits.append(data)
    log.info("dataset %s: %d train rows, %s eval rows", dataset.name, len(splits[0]),
             len(splits[1]) if splits[1] is not None else "no")
    return splits[0], splits[1]
