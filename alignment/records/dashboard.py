"""A W&B workspace comparing a sweep's members: reward margins, accuracies, chosen vs rejected, loss, grad_norm,
learning rate, each against the global step, runs filtered to the sweep's group and grouped by the swept key.

The spec is plain JSON (saved in the sweep dir when the sweep ends with tracker=wandb); publishing needs the
network and the [dashboards] extra (wandb-workspaces):

    python -m alignment.records.dashboard publish outputs/sweeps/<sweep>/wandb_dashboard.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

STEP = "train/global_step"
PANELS = (  # (title, metrics drawn together)
    ("reward margins", ["train/rewards/margins"]),
    ("reward accuracies", ["train/rewards/accuracies"]),
    ("chosen vs rejected rewards", ["train/rewards/chosen", "train/rewards/rejected"]),
    ("loss", ["train/loss"]),
    ("grad_norm", ["train/grad_norm"]),
    ("learning rate", ["train/learning_rate"]),
)
PUBLISH = "python -m alignment.records.dashboard publish {path}"


def dashboard_spec(project: str, entity: str | None, group: str, swept: list[str]) -> dict[str, Any]:
    # Workspace names reject many symbols (its emoji check); keep letters, digits, dashes and dots.
    name = re.sub(r"[^A-Za-z0-9 ._-]+", " ", f"sweep {group}")[:120]
    return {"name": name, "project": project, "entity": entity, "group": group,
            "group_by": swept, "x": STEP, "panels": [{"title": t, "y": y} for t, y in PANELS]}


def build_workspace(spec: dict[str, Any], entity: str):
    """The wandb-workspaces object for a spec (no network until .save())."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    panels = [wr.LinePlot(title=p["title"], x=spec["x"], y=list(p["y"])) for p in spec["panels"]]
    return ws.Workspace(
        entity=entity, project=spec["project"], name=spec["name"],
        sections=[ws.Section(name="preference training", panels=panels, is_open=True)],
        runset_settings=ws.RunsetSettings(filters=[ws.Metric("Group") == spec["group"]],
                                          groupby=[ws.Config(key) for key in spec["group_by"]]))


def publish(spec: dict[str, Any]) -> str:
    """Create the workspace on W&B; returns its URL."""
    import wandb

    entity = spec.get("entity") or wandb.Api().default_entity
    return build_workspace(spec, entity).save().url


def save_or_publish(spec: dict[str, Any], sweep_dir: Path, online: bool) -> str:
    """Online: publish now. Offline (or publishing fails): keep the spec and say how to publish it later."""
    path = sweep_dir / "wandb_dashboard.json"
    path.write_text(json.dumps(spec, indent=1) + "\n")
    if online:
        try:
            return f"W&B dashboard: {publish(spec)}"
        except Exception as err:  # no network, no wandb-workspaces: the spec stays for later
            return f"W&B dashboard not published ({type(err).__name__}: {err}); later: {PUBLISH.format(path=path)}"
    return f"W&B dashboard spec: {path}; publish it once online: {PUBLISH.format(path=path)}"


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] != "publish":
        raise SystemExit(f"usage: {PUBLISH.format(path='<sweep dir>/wandb_dashboard.json')}")
    print(publish(json.loads(Path(argv[1]).read_text())))


if __name__ == "__main__":
    main(sys.argv[1:])
