"""Dataset sources, row checks, mixing, length fitting, template linting and the data report.

Modules: schemas (row layouts, checks, TRL conversion), loading (hub id or local files), mix (which rows),
lengths (chat-template token lengths, prompt budget), lint (template bugs), report, pipeline (prepare).
"""

from __future__ import annotations

from alignment.errors import ConfigError
from alignment.config.schema import DatasetConfig
from alignment.data.loading import check_source, source_key
from alignment.data.pipeline import PreparedData, data_format, prepare
from alignment.data.report import format_report
from alignment.data.schemas import SCHEMAS


def check_sources(dataset: DatasetConfig, offline: bool) -> None:
    """Cheap checks of every source (settings, paths, offline availability); nothing is loaded."""
    names = [s.name for s in dataset.sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"dataset sources need distinct names (each seeds its own row selection); "
                          f"{', '.join(duplicates)} appears more than once. Set name= on the mix entries.")
    for index, source in enumerate(dataset.sources):
        check_source(source, source_key(index), offline)


__all__ = ["SCHEMAS", "PreparedData", "check_sources", "data_format", "format_report", "prepare", "source_key"]
