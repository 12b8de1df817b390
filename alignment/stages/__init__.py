"""One module per training stage; each exposes `build_trainer(cfg, run, start, callbacks)`."""

from __future__ import annotations

from importlib import import_module


def stage_module(name: str):
    return import_module(f"alignment.stages.{name}")
