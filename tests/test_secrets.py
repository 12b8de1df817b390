"""Secrets never reach a file, a directory name, a tracker or the console.

They come from the environment (HF_TOKEN, ...), from a setting that names a variable (`*_env`, `${secret:NAME}`),
or typed into an override value (a URL's password, a key): every one is masked wherever it would be written or
shown, Hydra's own outputs included (multirun.yaml, its launch lines, the sweep dir's name), and a key typed where
a variable's name belongs is refused before anything is written.
"""

from __future__ import annotations

import logging

import pytest
import yaml

from alignment.errors import ConfigError
from alignment.secrets import MASK, SECRET_NAMES_ENV, RedactingFilter, env_name_problem, is_secret_key, redact, redact_text
from alignment.preflight.secret_settings import check_secret_settings

from .conftest import run_cli

TOKEN = "hf_FAKEtoken0123456789abcdef"


@pytest.fixture(autouse=True)
def _no_declared_secrets(monkeypatch):
    """Names declared by one test (`*_env`, `${secret:NAME}`) are not inherited by the next."""
    monkeypatch.delenv(SECRET_NAMES_ENV, raising=False)


@pytest.mark.parametrize("key", ["hf_token", "HF_TOKEN", "WANDB_API_KEY", "api_key", "db.password", "secret"])
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["tokenizer", "pad_token", "eos_token", "max_new_tokens", "eval_mean_token_accuracy",
                                 "eval.judge.api_key_env"])
def test_ordinary_keys(key):
    assert not is_secret_key(key)


def test_redact_masks_keys_and_embedded_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cleaned = redact({"hub": {"token": "abc"}, "url": f"https://x/?t={TOKEN}", "tokenizer": {"pad_token": "<p>"}})
    assert cleaned == {"hub": {"token": MASK}, "url": f"https://x/?t={MASK}", "tokenizer": {"pad_token": "<p>"}}


@pytest.mark.parametrize("text, masked", [
    ("eval.judge.url=https://user:pa55word@judge.example/v1", "eval.judge.url=https://user:***@judge.example/v1"),
    # as Hydra prints a sweep member's overrides (`#0 : ...`)
    (r"#0 : eval.judge.url=https\://user\:pa55word@judge.example/v1 seed=1",
     r"#0 : eval.judge.url=https\://user\:***@judge.example/v1 seed=1"),
    ("key sk-proj-ABCDEFGHIJKLMNOPQRSTUV12, hf_abcdefghijklmnopqrstuvwx, AKIAABCDEFGHIJKLMNOP",
     "key ***, ***, ***"),
    ("Authorization: Bearer abcdefghijklmnop", "Authorization: Bearer ***"),
    ("+hub.token=abc123 db.password='x y' pad_token=<pad> max_new_tokens=128",
     "+hub.token=*** db.password='***' pad_token=<pad> max_new_tokens=128"),
    ("https://api.example/v1?api_key=abcdef&key=zzz&model=gpt", "https://api.example/v1?api_key=***&key=***&model=gpt"),
])
def test_secrets_typed_into_values_are_masked_by_their_shape(text, masked):
    assert redact_text(text) == masked


@pytest.mark.parametrize("text", [
    "commit 1d6e96e5f9b0a3c2d1e4f5a6b7c8d9e0f1a2b3c4, cache tiny_qwen2-a85cd407b83d",  # hashes we write on purpose
    "outputs/sweeps/beta-0.05-0.1_stage-dpo-1a2b3c4d", "ssh://git@github.com/x.git https://host:8080/path@x",
    "eval.judge.url=https://user:${secret:JUDGE_PASSWORD}@judge.example/v1",  # a reference, not a secret
    "eval.judge.api_key_env=OPENAI_API_KEY"])
def test_ordinary_values_are_left_alone(text):
    assert redact_text(text) == text


def test_log_filter_removes_secret_values_and_tracebacks(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", TOKEN)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "using key %s", (TOKEN,), None)
    RedactingFilter().filter(record)
    assert TOKEN not in record.getMessage() and MASK in record.getMessage()
    try:
        raise RuntimeError("https://u:pa55word@host failed")
    except RuntimeError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    RedactingFilter().filter(record)
    assert "pa55word" not in logging.Formatter().format(record)


@pytest.mark.parametrize("value, problem", [
    ("sk-abcdefghijklmnopqrstuvwxyz", "looks like a key"), ("hf_abcdefghijklmnopqrstuvwx", "looks like a key"),
    ("Zx81kd0sl2Qm9Lp3Rt7Yv", "looks like a key"), ("my key", "not the name"), ("3KEY", "not the name")])
def test_a_setting_that_names_a_variable_refuses_keys_and_non_names(value, problem):
    from alignment.preflight.compose import compose_run_config

    assert problem in env_name_problem(value)
    cfg = compose_run_config(["judge=http", f"eval.judge.api_key_env={value}"])
    with pytest.raises(ConfigError, match="eval.judge.api_key_env") as err:
        check_secret_settings(cfg)
    assert value not in str(err.value) and "\n" not in str(err.value) and "export OPENAI_API_KEY=" in str(err.value)


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "MY_JUDGE_KEY_2", "JUDGE_CREDS"])
def test_variable_names_are_accepted_and_their_values_masked(name, monkeypatch):
    from alignment.preflight.compose import compose_run_config

    assert env_name_problem(name) is None
    monkeypatch.setenv(name, "value-of-the-variable")
    check_secret_settings(compose_run_config(["judge=http", f"eval.judge.api_key_env={name}"]))
    assert redact_text("sent value-of-the-variable") == f"sent {MASK}"  # even where the name looks ordinary


def test_a_remote_judge_needs_its_key_set_a_local_one_does_not(monkeypatch):
    from alignment.preflight.compose import compose_run_config
    from alignment.preflight.validation import validate

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judge = ["stage=sft", "eval.after_training=true", "judge=http", "eval.judge.model=m", "dry_run=true"]
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set.*eval.judge.api_key_env=null"):
        validate(compose_run_config([*judge, "eval.judge.url=https://api.openai.com/v1"]))
    validate(compose_run_config([*judge, "eval.judge.url=http://localhost:8000/v1"]))


def test_a_secret_interpolation_is_read_from_the_environment_and_never_written(tmp_path, monkeypatch):
    """`${secret:NAME}`: the run uses the value; config.yaml masks it and records the reference, so rerun works."""
    from alignment.preflight.compose import compose_run_config
    from alignment.preflight.rerun import expand_rerun
    from alignment.records.rundir import RunDir, write_config

    override = "eval.judge.url=https://judge:${secret:ALIGNMENT_TEST_PASSWORD}@judge.example/v1"
    with pytest.raises(ConfigError, match=r"^\$\{secret:ALIGNMENT_TEST_PASSWORD\}: the environment variable "
                                          r"ALIGNMENT_TEST_PASSWORD is not set\.[^\n]*$"):
        compose_run_config(["judge=http", "eval.judge.model=m", override])
    monkeypatch.setenv("ALIGNMENT_TEST_PASSWORD", "pw-canary-4711")
    cfg = compose_run_config(["judge=http", "eval.judge.model=m", override, f"run_dir={tmp_path / 'run'}"])
    assert cfg.eval.judge.url == "https://judge:pw-canary-4711@judge.example/v1"
    write_config(RunDir(tmp_path / "run"), cfg)
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "pw-canary-4711" not in text and "url: https://judge:***@judge.example/v1" in text
    assert override in yaml.safe_load(text)["overrides"]
    assert override in expand_rerun([f"rerun={tmp_path / 'run'}"])  # the reference is carried, not refused
    with pytest.raises(ConfigError, match="looks like a key"):
        compose_run_config(["judge=http", "eval.judge.model=m",
                            "eval.judge.url=https://judge:${secret:hf_abcdefghijklmnopqrstuvwx}@j/v1"])


def test_hydra_writes_its_config_files_masked(tmp_path, monkeypatch):
    import hydra.core.utils as hydra_utils
    from omegaconf import OmegaConf

    from alignment.secrets import mask_hydra_writes

    monkeypatch.setattr(OmegaConf, "save", OmegaConf.save)  # restored after the test
    monkeypatch.setattr(hydra_utils, "_save_config", hydra_utils._save_config)
    mask_hydra_writes()
    config = OmegaConf.create({"hydra": {"overrides": {"task": ["eval.judge.url=https://u:pa55word@h/v1"]}},
                               "eval": {"judge": {"url": "https://u:pa55word@h/v1"}}, "dir": "${sweep:x}"})
    OmegaConf.save(config, tmp_path / "multirun.yaml")
    hydra_utils._save_config(config.hydra.overrides.task, "overrides.yaml", tmp_path / ".hydra")
    for path in (tmp_path / "multirun.yaml", tmp_path / ".hydra" / "overrides.yaml"):
        assert "pa55word" not in path.read_text() and "https://u:***@h/v1" in path.read_text()
    assert "${sweep:x}" in (tmp_path / "multirun.yaml").read_text()  # interpolations kept as they are


def test_sweep_dir_and_tracker_names_mask_secrets():
    from alignment.sweep.naming import sweep_name
    from alignment.records.trackers import member_label

    overrides = ["eval.judge.url=https://u:pa55word@h/v1", "beta=0.1,0.5"]
    assert "pa55word" not in sweep_name(overrides) and sweep_name(overrides).startswith("beta-0.1-0.5_eval.judge.url")
    assert sweep_name(overrides) == sweep_name(["eval.judge.url=https://u:rotated@h/v1", "beta=0.1,0.5"])
    assert member_label(["beta=0.1", "eval.judge.url=https://u:pa55word@h/v1"]) == \
        "beta=0.1 eval.judge.url=https://u:***@h/v1"


def test_the_sweep_name_masks_the_value_of_a_variable_the_command_line_names(monkeypatch):
    """The sweep dir is named before validation runs: `*_env=NAME` on the command line already masks NAME's value."""
    from alignment.sweep.naming import sweep_name

    monkeypatch.setenv("JUDGE_CREDS", "plain-looking-value")
    name = sweep_name(["eval.judge.api_key_env=JUDGE_CREDS", "eval.judge.model=plain-looking-value"])
    assert "plain-looking-value" not in name and name.startswith("eval.judge.api_key_env-JUDGE_CREDS_eval.judge.model-")


def test_a_key_given_for_a_variable_name_is_refused_before_anything_is_written(tmp_path):
    key = "sk-pasted0KEY1into2the3wrong4setting5"
    result = run_cli("--multirun", "stage=sft", "seed=1,2", f"eval.judge.api_key_env={key}", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "eval.judge.api_key_env holds what looks like a key" in lines[0], result.stderr
    assert key not in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == [], "no sweep dir, no run dir"


def _wandb_runs(sweep):
    from .test_trackers import wandb_records

    return [next(r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run")
            for path in sweep.rglob("run-*.wandb")]


@pytest.mark.slow
def test_no_secret_in_any_file_dir_name_tracker_or_console_of_a_sweep(tmp_path):
    """A sweep with a member per tracker (W&B offline, TensorBoard); secrets in the environment (HF_TOKEN), typed into
    an override value (a URL's password, and HF_TOKEN's value pasted into its query), and in the variable a secret
    setting names (whose name the generic filter does not know, its value pasted as another setting too)."""
    env_canary, override_canary, setting_canary = "hf_ENVcanary0123456789abcdefXY", "OVRcanary4242", "SETcanary-77x"
    result = run_cli("--multirun", "stage=sft", "tracker=wandb,tensorboard", "stage.max_steps=2",
                     "stage.global_batch_size=8", "stage.eval_steps=null", "judge=http",
                     f"eval.judge.url='https://user:{override_canary}@judge.example/v1?t={env_canary}'",
                     "eval.judge.api_key_env=JUDGE_CREDS", f"eval.judge.model={setting_canary}", cwd=tmp_path,
                     env={"HF_TOKEN": env_canary, "JUDGE_CREDS": setting_canary, "WANDB_API_KEY": "",
                          "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    canaries = [env_canary, override_canary, setting_canary]
    sweep = next((tmp_path / "outputs" / "sweeps").iterdir())
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    kinds = {p.name for p in files} | {p.suffix for p in files}
    assert {"multirun.yaml", "config.yaml", "summary.json", "run.log", ".wandb", "debug.log"} <= kinds, kinds
    assert any(p.name.startswith("events.out.tfevents") for p in files), "a TensorBoard event file"
    leaks = [(str(p.relative_to(tmp_path)), c) for p in files for c in canaries if c.encode() in p.read_bytes()]
    assert leaks == []
    names = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")]
    assert [n for n in names for c in canaries if c in n] == []
    assert [c for c in canaries if c in result.stdout + result.stderr] == []
    # Masked, not lost: Hydra's file, its launch lines and the W&B run name still show what was set.
    masked = "https://user:***@judge.example/v1?t=***"
    assert f"eval.judge.url='{masked}'" in (sweep / "multirun.yaml").read_text()
    launch_lines = [line for line in result.stdout.splitlines() if "[HYDRA]" in line and "eval.judge.url" in line]
    assert len(launch_lines) == 2 and all("user\\:***@judge" in line or "user:***@judge" in line
                                          for line in launch_lines), launch_lines
    assert "eval.judge.model-_eval.judge.url-https-user" in sweep.name  # the name's first 80 characters
    [run] = _wandb_runs(sweep)
    assert masked in run.display_name
    assert run.run_group == sweep.name
    # rerun= reads the recorded overrides: a masked secret is refused with what to do, never run with ***.
    rerun = run_cli(f"rerun={sweep / '0'}", cwd=tmp_path)
    assert rerun.returncode == 2 and "masked (a secret)" in rerun.stderr and "eval.judge.url" in rerun.stderr, \
        rerun.stderr


def test_log_lines_printed_above_progress_bars_are_masked(monkeypatch, capsys):
    """On a terminal, tqdm's handler replaces the (masked) console handler while bars are open: it masks too."""
    import alignment.records.console as console

    monkeypatch.setattr(console, "on_terminal", lambda: True)
    logger = logging.getLogger("alignment.test_secrets")
    with console.bars_above_logs():
        logger.warning("judge at https://u:pa55word@judge.example/v1")
    out = capsys.readouterr()
    assert "pa55word" not in out.out + out.err and "https://u:***@judge.example/v1" in out.out + out.err


def test_an_error_quoting_a_value_masks_the_secret_in_it():
    err = ConfigError("sweep member [eval.judge.url=https://u:pa55word@h/v1]: something is wrong")
    assert str(err) == "sweep member [eval.judge.url=https://u:***@h/v1]: something is wrong"


@pytest.mark.parametrize("setting", [f"run_name=leak-{TOKEN}", "tracker.project=https://u:pa55word@wandb.example"])
def test_a_secret_in_a_setting_that_names_dirs_or_runs_is_refused(setting):
    from alignment.preflight.compose import compose_run_config

    with pytest.raises(ConfigError, match=f"^{setting.split('=')[0]} holds a secret") as err:
        check_secret_settings(compose_run_config([setting]))
    assert TOKEN not in str(err.value) and "pa55word" not in str(err.value)
