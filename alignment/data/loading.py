"""Where a source's rows come from: a hub id (real `datasets.load_dataset`) or local files.

Local forms, all read by `datasets` itself so that only the source differs from the hub path:
- a directory of `<split>.jsonl` / `.json` / `.parquet` files (one file per split);
- a directory written by `save_to_disk` (a DatasetDict, or a single Dataset used as the train split);
- a downloaded hub snapshot (`huggingface-cli download --repo-type dataset ... --local-dir DIR`);
- one `.jsonl` / `.json` / `.parquet` file, which holds the train split only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from alignment.errors import ConfigError
from alignment.config.schema import SourceConfig
from alignment.config.sources import in_hub_cache, looks_local
from alignment.data.schemas import SCHEMAS, check_row, missing_columns

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Location:
    kind: str              # hub | file | split_files | saved_dict | saved_single | snapshot
    path: str


def locate(source: SourceConfig) -> Location:
    if not looks_local(source.path):
        return Location("hub", source.path)
    path = Path(source.path).expanduser().resolve()
    if path.is_file():
        return Location("file", str(path))
    if (path / "dataset_dict.json").exists():
        return Location("saved_dict", str(path))
    if (path / "state.json").exists():
        return Location("saved_single", str(path))
    if any(p.suffix in FILE_BUILDERS and p.stem in _named_splits(source) for p in path.iterdir()):
        return Location("split_files", str(path))
    return Location("snapshot", str(path))


def _named_splits(source: SourceConfig) -> set[str]:
    return {s for s in (source.train_split, source.eval_split) if s}


def source_key(index: int) -> str:
    """The config key of the index-th source, as users write it in messages and overrides."""
    return "dataset" if index == 0 else f"dataset.mix[{index - 1}]"


def holds_train_only(location: Location) -> bool:
    return location.kind in ("file", "saved_single")


def check_source(source: SourceConfig, key: str, offline: bool) -> None:
    """Paths and offline availability, before anything loads; `key` is the config key users write."""
    if looks_local(source.path):
        path = Path(source.path).expanduser()
        if not path.exists():
            raise ConfigError(f"{key}.path={source.path} does not exist. Point it at a .jsonl/.json/.parquet file, "
                              f"a directory of <split>.jsonl files, or a directory written by save_to_disk.")
        if path.is_file() and path.suffix not in FILE_BUILDERS:
            raise ConfigError(f"{key}.path={source.path}: unsupported file type {path.suffix!r}; use one of "
                              f"{', '.join(FILE_BUILDERS)}.")
        location = locate(source)
        if holds_train_only(location) and source.eval_split and source.test_size == 0:
            raise ConfigError(
                f"{key}.path={source.path} holds one split (used as {key}.train_split={source.train_split}), but "
                f"{key}.eval_split={source.eval_split} is also named. Set {key}.test_size=0.01 to hold out rows "
                f"from it, {key}.eval_split=null to train without evaluation, or point {key}.path at a directory "
                f"with {source.train_split}.jsonl and {source.eval_split}.jsonl.")
        _check_local_splits(source, location)
        return
    if offline and not in_hub_cache(source.path, "dataset"):
        name = source.path.split("/")[-1]
        raise ConfigError(
            f"{key}.path={source.path} is a hub id, the run is offline and no local copy is cached. On a connected "
            f"machine run `huggingface-cli download --repo-type dataset {source.path} --local-dir data/{name}`, "
            f"copy data/{name} here and set {key}.path=data/{name} (a .jsonl/.parquet file or a save_to_disk "
            f"directory works too).")


def _check_local_splits(source: SourceConfig, location: Location) -> None:
    """What loading would refuse, found without loading: a named split that is not there, and (one line read) a
    .jsonl whose first row lacks the schema's columns. Dry runs and runs get the same message."""
    path = Path(location.path)
    if location.kind == "split_files":
        files = _split_files(path)
    elif location.kind == "saved_dict":
        files = {name: None for name in json.loads((path / "dataset_dict.json").read_text()).get("splits", [])}
    elif location.kind == "file":
        files = {source.train_split: path}
    else:
        return
    for split in sorted(_named_splits(source)):
        if location.kind == "file" and split != source.train_split:
            continue  # held out by test_size, checked above
        _require_split(source, split, sorted(files))
        file = files[split]
        if file is not None and file.suffix == ".jsonl":
            with open(file, encoding="utf-8") as handle:
                first = next((line for line in handle if line.strip()), None)
            try:
                row = json.loads(first) if first else None
            except json.JSONDecodeError:
                continue  # loading names the line (_diagnose_json)
            if isinstance(row, dict) and missing_columns(SCHEMAS[source.schema], list(row)):
                _diagnose_json(source, file)


def settings_error(source: SourceConfig, key: str) -> str | None:
    if source.schema not in SCHEMAS:
        return f"{key}.schema={source.schema} is not supported. Valid values: {', '.join(SCHEMAS)}."
    if not 0 < source.fraction <= 1:
        return f"{key}.fraction must be in (0, 1] (got {source.fraction})."
    if source.rows is not None and (source.rows < 1 or source.fraction != 1.0):
        return f"{key}.rows must be >= 1 and leaves {key}.fraction at 1.0 (got rows={source.rows}, " \
               f"fraction={source.fraction}); give one of the two."
    if not 0 <= source.test_size < 1:
        return f"{key}.test_size must be in [0, 1) (got {source.test_size})."
    if source.test_size > 0 and source.eval_split:
        return f"{key}.test_size={source.test_size} holds out rows from {source.train_split}, but " \
               f"{key}.eval_split={source.eval_split} is set too; keep one (eval_split=null to use test_size)."
    return None


def content_fingerprint(source: SourceConfig) -> str | None:
    """A hash of the local bytes a source reads, or None for a hub id (its loaded fingerprint is used)."""
    location = locate(source)
    if location.kind == "hub":
        return None
    path = Path(location.path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                  and not p.name.startswith("cache-"))
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path.parent if path.is_file() else path)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_split(source: SourceConfig, split: str):
    """One split as a `datasets.Dataset`, with the schema's columns checked."""
    from datasets import load_dataset, load_from_disk

    location = locate(source)
    if location.kind == "hub":
        data = _load_hub(source, split)
    elif location.kind == "saved_dict":
        saved = load_from_disk(location.path)
        _require_split(source, split, list(saved))
        data = saved[split]
    elif location.kind == "saved_single":
        data = load_from_disk(location.path)
    elif location.kind == "file":
        data = _load_file(source, Path(location.path))
    elif location.kind == "split_files":
        files = _split_files(Path(location.path))
        _require_split(source, split, sorted(files))
        data = _load_file(source, files[split])
    else:
        try:
            data = load_dataset(location.path, split=split)
        except ValueError as err:  # datasets names the splits it found
            raise ConfigError(f"{source.name}: cannot load split {split!r} from {location.path}: {err}") from None
    schema = SCHEMAS[source.schema]
    missing = missing_columns(schema, data.column_names)
    if missing:
        raise ConfigError(
            f"{source.name} ({source.path}, split {split}) has no column(s) {', '.join(missing)}. Rows in the "
            f"{schema.hub_id} schema have {', '.join(schema.columns)} (we read {', '.join(schema.required)}); "
            f"found: {', '.join(data.column_names)}. Fix the file, or pick the schema it follows "
            f"(schema=ultrachat | ultrafeedback | orpo).")
    return data


def _load_hub(source: SourceConfig, split: str):
    from datasets import load_dataset

    try:
        return load_dataset(source.path, split=split, revision=source.revision)
    except ValueError as err:  # datasets names the available splits in its message
        raise ConfigError(f"{source.name}: {err}") from None
    except Exception as err:
        if not any(word in type(err).__name__ for word in ("Connection", "NotFound", "Offline", "Timeout")):
            raise
        name = source.path.split("/")[-1]
        raise ConfigError(
            f"{source.name}: cannot load {source.path} split {split} from the hub ({type(err).__name__}). "
            f"Without network access, download it on a connected machine (`huggingface-cli download --repo-type "
            f"dataset {source.path} --local-dir data/{name}`) and set the source's path=data/{name}, or point it "
            f"at a .jsonl/.parquet file.") from None


def _split_files(directory: Path) -> dict[str, Path]:
    """A directory of `<split>.jsonl|.json|.parquet` files, by split name."""
    return {p.stem: p for p in directory.iterdir() if p.suffix in FILE_BUILDERS}


def _require_split(source: SourceConfig, split: str, available: list[str]) -> None:
    if split not in available:
        raise ConfigError(f"{source.name}: split {split!r} not found in {source.path} (available: "
                          f"{', '.join(available)}). Set train_split/eval_split to one of these.")


def _load_file(source: SourceConfig, file: Path):
    """Read with `datasets`; when Arrow cannot (mixed types across rows), find the offending row ourselves."""
    from datasets import load_dataset

    try:
        return load_dataset(FILE_BUILDERS[file.suffix], data_files=str(file), split="train")
    except Exception as err:  # Arrow's message names no row: rescan the file to say which row and field
        if FILE_BUILDERS[file.suffix] == "json":
            _diagnose_json(source, file)
        raise ConfigError(f"{source.name}: could not read {file}: {type(err).__name__}: {err}") from err


def _diagnose_json(source: SourceConfig, file: Path) -> None:
    schema = SCHEMAS[source.schema]
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for number, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{source.name}: {file} line {number + 1} is not valid JSON ({err.msg}).") from None
    for index, row in enumerate(rows):
        missing = missing_columns(schema, list(row))
        problem = check_row(schema, row) if not missing else None
        if missing or (problem and problem.kind == "malformed"):
            where = f"field {', '.join(missing)} is missing" if missing else f"{problem.field} {problem.detail}"
            raise ConfigError(f"{source.name} row {index} ({file}): {where}. Every row must follow the "
                              f"{schema.hub_id} schema; fix or remove this row.")
