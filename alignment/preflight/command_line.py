"""The command line before Hydra sees it: one spelling per meaning, `rerun=` expanded, `--cfg job` answered by us.

- `--cfg=job` is `--cfg job` (Hydra's argparse would read the first as a flag and the second as flag + value).
- `experiment=null` is `~experiment` (no preset), instead of a traceback from Hydra's defaults list.
- `--cfg job` prints what will run: the composed and checked config of every stage the command would run (each
  chain link, each sweep member), rather than Hydra's composition, which still holds an unused chain.
"""

from __future__ import annotations

import yaml
from hydra.errors import HydraException

from alignment.config.argv import cli_overrides
from alignment.preflight.compose import member_stages, sweep_members
from alignment.errors import ConfigError
from alignment.config.schema import as_dict
from alignment.preflight.rerun import expand_rerun
from alignment.secrets import redact

_CFG_FLAGS = ("--cfg", "-c")


def normalise(argv: list[str]) -> list[str]:
    spelled: list[str] = []
    for arg in argv:
        flag, _, value = arg.partition("=")
        if flag in _CFG_FLAGS and value:
            spelled += [flag, value]
        elif arg in ("experiment=null", "experiment=None", "experiment=~"):
            spelled.append("~experiment")
        else:
            spelled.append(arg)
    return expand_rerun(spelled)


def wants_job_config(argv: list[str]) -> bool:
    return any(arg in _CFG_FLAGS and argv[i + 1:i + 2] == ["job"] for i, arg in enumerate(argv))


def job_config_text(argv: list[str]) -> str:
    """`--cfg job`: the YAML of every stage the command runs, in order, as config.yaml will record it."""
    rest = [a for i, a in enumerate(argv) if a not in _CFG_FLAGS and not (i and argv[i - 1] in _CFG_FLAGS)]
    overrides = cli_overrides(rest) or []
    try:
        members = sweep_members(overrides)
    except HydraException as err:
        raise ConfigError(f"cannot parse the command line: {err}") from None
    documents = []
    for number, member in enumerate(members):
        configs, chained = member_stages(member)
        for index, link_cfg in enumerate(configs, start=1):
            where = f"sweep member {number}: " if len(members) > 1 else ""
            where += f"chain link {index}/{len(configs)}: " if chained else ""
            parent = " (parent_run: the previous link's run dir)" if chained and index > 1 else ""
            documents.append(f"# {where}stage {link_cfg.stage.name}{parent}\n"
                             + yaml.safe_dump(redact(as_dict(link_cfg)), sort_keys=False))
    return "---\n".join(documents)
