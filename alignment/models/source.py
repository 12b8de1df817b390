"""Where a model's weights come from: a local dir, a hub id, or a GGUF file."""

from __future__ import annotations
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from alignment.errors import ConfigError
from alignment.config.sources import looks_local


@dataclass(frozen=True)
class ModelSource:
    """Where a checkpoint's files are: a dir or hub id, and the GGUF file inside it if it is one."""

    reference: str                  # an absolute local dir, or a hub id
    gguf_file: Optional[str] = None
    local: bool = True
    given: str = ""                 # as the user wrote it, for messages

    @property
    def label(self) -> str:
        return str(Path(self.reference) / self.gguf_file) if self.gguf_file and self.local else \
            f"{self.reference}:{self.gguf_file}" if self.gguf_file else self.reference

    def load_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def model_source(name_or_path: str, gguf_file: Optional[str] = None, key: str = "model.name_or_path") -> ModelSource:
    """A name_or_path (and gguf_file) as a ModelSource; local paths become absolute, so saved runs load anywhere."""
    if name_or_path.endswith(".gguf"):
        if gguf_file:
            raise ConfigError(f"{key}={name_or_path} is a GGUF file and model.gguf_file={gguf_file} names another. "
                              f"Give one: the file's path in {key}, or its dir in {key} and its name in model.gguf_file.")
        path = Path(name_or_path).expanduser().resolve()
        return ModelSource(str(path.parent), path.name, local=True, given=name_or_path)
    if looks_local(name_or_path):
        return ModelSource(str(Path(name_or_path).expanduser().resolve()), gguf_file, local=True, given=name_or_path)
    return ModelSource(name_or_path, gguf_file, local=False, given=name_or_path)
