"""GGUF model sources, dequantized once into an ordinary checkpoint dir under `$ALIGNMENT_CACHE/gguf/`.

Every later load (each stage, a merge, the evaluation, an adapter's base) is then a plain from_pretrained of
safetensors (a GGUF load dequantizes every tensor again: 12 s for the 135M SmolLM2 on 2 cores), and an adapter
trained on it names a real model dir as its base. The entry is keyed by the file's absolute path, size, mtime
and the transformers version; `gguf_source.json` inside it records the file and its sha256 for the lineage.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from alignment.records.cache import cache_root, publish_once, sha256
from alignment.models.source import ModelSource
from alignment.records.cache import MANIFEST

log = logging.getLogger(__name__)

GGUF_DIR = "gguf"
ORIGIN_FILE = "gguf_source.json"


def _key(path: Path) -> str:
    import transformers

    stat = path.stat()
    spec = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def converted_dir_for(source: ModelSource) -> Path:
    path = Path(source.reference) / source.gguf_file
    return cache_root() / GGUF_DIR / f"{Path(source.gguf_file).stem}-{_key(path)}"


def converted_dir(source: ModelSource) -> Path | None:
    """The converted checkpoint of this GGUF file when it has been built, else None."""
    if not (Path(source.reference) / source.gguf_file).is_file():
        return None

    target = converted_dir_for(source)
    return target if (target / MANIFEST).exists() else None


def ensure_converted(source: ModelSource) -> Path:
    """The GGUF file dequantized (float32: Q4/Q8 blocks are exact in it) into a checkpoint dir, built on first use."""
    target = converted_dir_for(source)
    gguf_path = Path(source.reference) / source.gguf_file

    def convert(staging: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("dequantizing %s into %s (once; later runs load the converted checkpoint)", gguf_path, target)
        loaded = AutoModelForCausalLM.from_pretrained(source.reference, gguf_file=source.gguf_file,
                                                      dtype=torch.float32)
        # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its weights are
        # already dequantized: the same weights in a plain instance of the class save normally.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), assign=True)
        model.tie_weights()
        del loaded
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(source.reference, gguf_file=source.gguf_file).save_pretrained(staging)
        (staging / ORIGIN_FILE).write_text(json.dumps(
            {"gguf_file": str(gguf_path), "sha256": sha256(gguf_path), "bytes": gguf_path.stat().st_size}, indent=2))

    publish_once(target, convert, "converted GGUF checkpoint")
    return target


def gguf_origin(weights: Path | str) -> dict[str, Any] | None:
    """The GGUF file a converted checkpoint dir came from (path, sha256), or None for any other dir."""
    record = Path(str(weights)) / ORIGIN_FILE
    return json.loads(record.read_text()) if record.is_file() else None
