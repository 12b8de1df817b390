"""From a validated RunConfig to finished run dirs: one stage, or a chain of stages (SFT → DPO)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignment.preflight.compose import compose_run_config, link_overrides
from alignment.errors import ConfigError
from alignment.config.schema import RunConfig, freeze
from alignment.models.modeling import uses_cuda
from alignment.launch.backends import engine_report, save_model
from alignment.plan.resolved import plan_of, write_plan
from alignment.records.diagnostics import Diagnostics
from alignment.plan.dryrun import describe
from alignment.evaluation import EVAL_DIR, evaluate, format_headline, subjects_of_config, subjects_of_run
from alignment.records.model_card import write_model_card
from alignment.records.plots import plot_run
from alignment.records.provenance import provenance
from alignment.launch.launcher import LaunchFailed, launch, launch_preview, slurm_run_path
from alignment.plan.processes import is_secondary_machine, needs_launch, resolve_launcher
from alignment.runtime.ranks import init_process_group, is_main_process, launched_run_dir, main_process_first, shutdown_process_group
from alignment.runtime.preemption import Interrupted, StopAtStepBoundary, StopRequest, active_request, handling_signals, phase_boundary
from alignment.records.rundir import RunDir, check_resume_matches, check_run_dir, default_run_name, has_model, is_finished, last_complete_checkpoint, new_run_path, newest_complete_checkpoint, read_summary, update_summary, write_config
from alignment.config.registry import stage_of
from alignment.sweep.naming import current_sweep_name
from alignment.sweep.member_process import parallel_member
from alignment.sweep.sweeps import member_state, objective_value, record_member
from alignment.records.trackers import MEMBER_LABEL_ENV, SWEEP_GROUP_ENV, finish_tracker, member_label, start_tracker, tracker_environment
from alignment.models.start import lineage, prepare_start, resolve_start
from alignment.records.tracking import CheckpointMarker, MetricsWriter, TokenCount, attach_run_log, detach_run_log, format_table, read_metrics, train_records, truncate_metrics, whole_run_train_loss
from alignment.config.offline import is_offline
from alignment.preflight.validation import validate
from alignment.data import format_report
from alignment.stages.common import prepare_data

log = logging.getLogger(__name__)


@dataclass
class StageOutcome:
    run: RunDir
    summary: dict[str, Any]
    trainer: Any  # the TRL trainer, kept for callers that inspect the trained and reference models


def with_run_dir(cfg: RunConfig, path: Path) -> RunConfig:
    # Absolute, so that summaries and a child's parent_run stay valid from any working directory.
    return freeze(dataclasses.replace(cfg, run_dir=str(path.resolve())))


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def batch_summary(cfg: RunConfig) -> dict[str, int]:
    batch = plan_of(cfg).batch
    return {"global": batch.global_batch, "micro": batch.micro_batch, "accumulation": batch.accumulation,
            "processes": batch.processes}


def _resume_point(run: RunDir, cfg: RunConfig) -> Path | None:
    """On resume: the checkpoint to continue from (None: from the start), with metrics.jsonl cut back to it."""
    check_resume_matches(run, cfg)
    if not run.config.exists():  # killed between creating the dir and writing its config
        write_config(run, cfg)
    resume_from = last_complete_checkpoint(run)
    truncate_metrics(run.metrics, int(resume_from.name.split("-")[-1]) if resume_from else 0)
    return resume_from


def _segments(run: RunDir, resume_from: Path | None) -> list[dict[str, Any]]:
    """The training segments so far (one per start or resume), with the one starting now appended."""
    earlier = list((read_summary(run.path) or {}).get("segments") or []) if resume_from is not None else []
    step = int(resume_from.name.split("-")[-1]) if resume_from else 0
    return [*earlier, {"from_step": step, "started_at": _now()}]


def _close_segment(run: RunDir, status: str, step: int | None, seconds: float) -> list[dict[str, Any]]:
    segments = list((read_summary(run.path) or {}).get("segments") or [{}])
    segments[-1] = {**segments[-1], "to_step": step, "ended_at": _now(), "seconds": round(seconds, 3),
                    "status": status}
    return segments


def run_stage(cfg: RunConfig, callbacks=()) -> StageOutcome:
    """Train one stage into cfg.run_dir; resume from its last complete checkpoint when cfg.resume is set.

    With resume, a stage whose model is already saved is not trained again (what remains is its evaluation).
    SIGTERM/SIGINT stop it at a step boundary with a checkpoint and raise Interrupted (alignment/runtime/preemption.py).
    """
    run = RunDir(Path(cfg.run_dir))
    if cfg.resume and has_model(run.path):
        log.info("%s stage in %s: model already trained and saved; nothing to train", cfg.stage.name, run.path)
        return StageOutcome(run=run, summary=read_summary(run.path) or {}, trainer=None)
    resume_from = None
    if cfg.resume and read_summary(run.path) is not None:
        resume_from = _resume_point(run, cfg)
    else:
        write_config(run, cfg)
    phase_boundary(f"{cfg.stage.name}:created")
    handler = attach_run_log(run) if is_main_process() else None
    diagnostics = Diagnostics(cfg.diagnostics, stage_of(cfg).preference_metrics)
    owned = active_request() is None  # a stage run on its own (tests, the API) handles signals for itself
    stop = StopRequest(cfg.preemption.grace_s).install() if owned else active_request()
    stop.on_timeout = lambda message: update_summary(run, status="interrupted", error=message, ended_at=_now(),
                                                     last_complete_checkpoint=newest_complete_checkpoint(run))
    stopper, tokens = StopAtStepBoundary(stop, cfg.stage.name), TokenCount()
    tracker, started, trainer = None, time.perf_counter(), None
    try:
        with main_process_first():  # rank 0 merges a parent adapter or builds the tiny twin; the others reuse it
            start = prepare_start(cfg)
        update_summary(run, status="running", stage=cfg.stage.name, run_dir=str(run.path), started_at=_now(),
                       start_model=str(start.weights), parent_run=cfg.parent_run, lineage=lineage(cfg, start),
                       batch=batch_summary(cfg), plan=plan_of(cfg).as_dict(),
                       stage_settings=stage_of(cfg).own_settings(cfg.stage),
                       segments=_segments(run, resume_from),
                       resumed_from=str(resume_from) if resume_from else None, **provenance())
        log.info("%s stage in %s, starting from %s %s", cfg.stage.name, run.path, start.kind,
                 start.adapter or start.weights)
        metrics_writer = MetricsWriter(run)
        earlier = read_metrics(run.metrics)  # on resume: the steps before the checkpoint, for the diagnostics
        diagnostics.records.extend(train_records(earlier))
        tracker_environment(cfg, run)
        tracker = start_tracker(cfg, run) if is_main_process() else None
        stage = stage_of(cfg)
        trainer = stage.build_trainer(cfg, run, start, callbacks=[metrics_writer, CheckpointMarker(run), diagnostics,
                                                                  tokens, stopper, *callbacks])
        tokens.trainer = trainer
        # The implementation the loaded model uses (after any fallback), read back rather than recomputed.
        update_summary(run, attention=getattr(trainer.model.config, "_attn_implementation", None))
        if stage.summarize is not None:
            update_summary(run, **stage.summarize(trainer))
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        phase_boundary(f"{cfg.stage.name}:trained")
        if stop.requested:  # stopped at a step boundary; the trainer saved a checkpoint there
            raise Interrupted(stop.signal_name, stopper.stopped_at, newest_complete_checkpoint(run))
        update_summary(run, distributed=engine_report(trainer, cfg), timing=metrics_writer.timing,
                       cuda_memory=_cuda_memory(cfg),
                       **trainer.token_tally.summary(trainer.accelerator, trainer.batching_strategy, trainer.packed_row,
                                                     metrics_writer.train_summary.get("train_runtime")))
        eval_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
        save_model(trainer, run.model)
        phase_boundary(f"{cfg.stage.name}:saved")
    except BaseException as err:
        interrupted = isinstance(err, (KeyboardInterrupt, Interrupted))
        status = "interrupted" if interrupted else "failed"
        step = trainer.state.global_step if trainer is not None else None
        try:
            update_summary(run, status=status, error=_one_line_error(err), ended_at=_now(),
                           diagnostics=diagnostics.summary(), last_complete_checkpoint=newest_complete_checkpoint(run),
                           segments=_close_segment(run, status, step, time.perf_counter() - started),
                           **({"interrupted_at_step": step, "signal": getattr(err, "signal_name", "SIGINT")}
                              if interrupted else {}))
        except OSError as unwritable:  # a full disk may refuse the summary too; the error below still says why
            log.error("could not record the status in %s: %s", run.summary, unwritable)
        log.error("%s stage %s in %s: %s", cfg.stage.name, status, run.path, _one_line_error(err))
        finish_tracker(tracker, failed=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise ConfigError(f"no space left on the device of {run.path} while writing the run ({err}). Its newest "
                              f"complete checkpoint is intact: free space, then resume with resume=true "
                              f"run_dir={run.path}.") from None
        raise
    finally:
        stop.in_training_loop, stop.on_timeout = False, None
        if owned:
            stop.uninstall()
        if is_main_process():
            plot_run(read_metrics(run.metrics), run.plots, f"{cfg.stage.name} {run.path.name}")
        if handler is not None:
            detach_run_log(handler)
    records = read_metrics(run.metrics)
    train = dict(metrics_writer.train_summary)
    if resume_from is not None:  # the trainer's own numbers cover the resumed segment only
        train.update(train_loss=whole_run_train_loss(records), resumed_segment_train_loss=train.get("train_loss"))
    segments = _close_segment(run, "finished", trainer.state.global_step, time.perf_counter() - started)
    train["seconds_all_segments"] = round(sum(s.get("seconds", 0) for s in segments), 3)  # load, train, save
    train_records_ = train_records(records)
    summary = update_summary(
        run, status="trained" if cfg.eval.after_training else "finished", ended_at=_now(), model_path=str(run.model),
        final_metrics=train_records_[-1] if train_records_ else {}, eval_metrics=eval_metrics, train=train,
        num_tokens=int(getattr(trainer, "_total_train_tokens", 0)) or None, diagnostics=diagnostics.summary(),
        segments=segments)
    if is_main_process():
        write_model_card(cfg, run, summary)
    finish_tracker(tracker, failed=False)
    return StageOutcome(run=run, summary=summary, trainer=trainer)


def _cuda_memory(cfg: RunConfig) -> dict[str, int] | None:
    """This process's CUDA allocator peaks over the stage (what the memory planner predicts), None off CUDA."""
    if not uses_cuda(cfg):
        return None
    import torch

    return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def _one_line_error(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:500]}" if text else type(err).__name__


def report_data(cfg: RunConfig, previous: RunConfig | None = None) -> dict[str, Any]:
    """Prepare the stage's data without loading weights; write data_report.json and print the report."""

    validate(cfg, previous=previous)
    run = RunDir(Path(cfg.run_dir))
    write_config(run, cfg)
    # A chain's DPO link reports before its SFT parent exists: SFT keeps the tokenizer, so the base's is used.
    parent_ready = cfg.parent_run and (RunDir(Path(cfg.parent_run)).model / "config.json").exists()
    start = resolve_start(cfg if parent_ready else dataclasses.replace(cfg, parent_run=None))
    _, data = prepare_data(cfg, run, start.tokenizer)
    update_summary(run, status="data_report", stage=cfg.stage.name, run_dir=str(run.path), ended_at=_now())
    print(f"\n{format_report(data.report)}\n\nwritten: {run.data_report}")
    return data.report


def chain_configs(cfg: RunConfig, user_overrides: list[str], chain_dir: Path) -> list[RunConfig]:
    """Compose every link with its own run dir under the chain dir; each link starts from the previous one."""
    configs, parent = [], None
    for index, overrides in enumerate(link_overrides(cfg, user_overrides), start=1):
        # The parent is an override, so that the link's recorded overrides compose this link alone (rerun=).
        link = compose_run_config([*overrides, f"parent_run='{parent}'"] if parent else overrides)
        link_dir = RunDir(chain_dir).link(index, link.stage.name).path
        configs.append(freeze(dataclasses.replace(link, run_dir=str(link_dir))))
        parent = link_dir
    return configs


def _pending_links(cfg: RunConfig, links: list[RunConfig]) -> list[RunConfig]:
    """Links still to run, validated; on resume a finished link is skipped and a started one continues."""
    pending = []
    for index, link in enumerate(links):
        summary = read_summary(Path(link.run_dir))
        if cfg.resume and summary and summary.get("status") == "finished":
            log.info("skipping finished %s link %s", link.stage.name, link.run_dir)
            continue
        link = freeze(dataclasses.replace(link, resume=bool(cfg.resume and summary)))
        validate(link, previous=links[index - 1] if index > 0 else None)
        pending.append(link)
    return pending


def run_chain(cfg: RunConfig, links: list[RunConfig], chain_dir: Path) -> list[StageOutcome]:
    chain = RunDir(chain_dir)
    pending = _pending_links(cfg, links)
    if cfg.resume:
        check_resume_matches(chain, cfg)
    if not cfg.resume or not chain.config.exists():  # resume of a chain killed before its config was written
        write_config(chain, cfg)
    phase_boundary("chain:created")
    update_summary(chain, status="running", kind="chain", started_at=_now(),
                   links=[{"stage": link.stage.name, "run_dir": link.run_dir} for link in links])
    try:
        outcomes = [run_stage(link) for link in pending]
    except BaseException as err:
        status = "interrupted" if isinstance(err, (KeyboardInterrupt, Interrupted)) else "failed"
        update_summary(chain, status=status, error=_one_line_error(err), ended_at=_now())
        raise
    # Finished once every link is, after-training evaluations included (run() marks it then).
    update_summary(chain, status="finished" if all(is_finished(Path(link.run_dir)) for link in links) else "trained",
                   ended_at=_now())
    return outcomes


def choose_run_path(cfg: RunConfig, job_dir: Path | None, chained: bool) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    if job_dir is not None:  # a --multirun member: Hydra made one directory per member in the sweep dir
        return job_dir
    return slurm_run_path(cfg, default_run_name(cfg, chained)) or new_run_path(cfg, chained)


def quiet_libraries() -> None:
    """Progress bars only on a terminal; library deprecation chatter never (CI logs stay readable)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    if not sys.stderr.isatty():
        import datasets
        from transformers.utils import logging as hf_logging

        datasets.disable_progress_bars()
        os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference precompute reads this
        hf_logging.disable_progress_bar()


def run(cfg: RunConfig, user_overrides: list[str], job_dir: Path | None = None) -> Path | None:
    """Dispatch a composed command: a dry run, a launch of several ranks, a chain of stages or one stage.

    Returns the run dir. In a launched rank the run dir is the one its parent chose (run_dir=...).
    """
    member = parallel_member()  # a member process of hydra/launcher=parallel: runs as the basic launcher's members do
    if member is not None and job_dir is None:
        run_member(cfg, member.overrides, member.dir, member.number)
        return member.dir
    chained = bool(link_overrides(cfg, user_overrides))
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    quiet_libraries()
    if is_offline(cfg):
        os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = resolve_launcher(with_run_dir(cfg, choose_run_path(cfg, job_dir, chained)))
    path = Path(cfg.run_dir)
    if cfg.dry_run:
        print(describe(chain_configs(cfg, user_overrides, path) if chained else [cfg], launch_preview(cfg, user_overrides)))
        return None
    if cfg.data_report:
        links = chain_configs(cfg, user_overrides, path) if chained else [cfg]
        for index, link in enumerate(links):
            report_data(link, previous=links[index - 1] if index > 0 else None)
        return path
    shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    if not stage_of(cfg).trains:
        with handling_signals(cfg.preemption.grace_s):
            report = evaluate_stage(cfg)
        print(f"\n{format_headline(report)}\n\nrun dir: {shown}")
        return path
    if needs_launch(cfg):
        links = _launch(cfg, user_overrides, chained)  # forwards SIGTERM/SIGINT to the ranks
        if is_secondary_machine(cfg):
            return path  # machine 0 evaluates and reports for the whole job (the run dir is shared)
    elif launched_run_dir() is not None:
        with handling_signals(cfg.preemption.grace_s):
            _train_as_rank(cfg, user_overrides, chained)
        return path  # the launching parent evaluates and prints, not its ranks
    else:
        with handling_signals(cfg.preemption.grace_s):
            links = _train(cfg, user_overrides, chained)
    with handling_signals(cfg.preemption.grace_s):
        reports = [evaluate_after_training(link) for link in links if link.eval.after_training]
    if chained and all(is_finished(Path(link.run_dir)) for link in links):
        update_summary(RunDir(path), status="finished", ended_at=_now())
    evaluated = "".join(f"\n\n{format_headline(r)}" for r in reports if r)
    print(f"\n{format_table(read_metrics(RunDir(Path(links[-1].run_dir)).metrics))}{evaluated}\n\nrun dir: {shown}")
    return path


def evaluate_after_training(cfg: RunConfig) -> dict[str, Any] | None:
    """eval.after_training: evaluate a finished stage in this (single, non-rank) process; rewrite its model card."""
    run = RunDir(Path(cfg.run_dir))
    if not has_model(run.path):
        return None
    summary = read_summary(run.path) or {}
    if (summary.get("evaluation") or {}).get("status") == "finished":  # a resumed chain skips what is done
        report = json.loads((run.path / EVAL_DIR / "report.json").read_text())
    else:
        handler = attach_run_log(run)
        try:
            phase_boundary(f"{cfg.stage.name}:evaluating")
            report = evaluate(cfg, run, subjects_of_run(run.path, cfg))
        finally:
            detach_run_log(handler)
    phase_boundary(f"{cfg.stage.name}:evaluated")
    write_model_card(cfg, run, update_summary(run, status="finished", ended_at=_now()))
    return report


def evaluate_stage(cfg: RunConfig) -> dict[str, Any]:
    """stage=eval: evaluate the parent run's model (or the configured one) into a run dir of its own."""
    validate(cfg)
    run = RunDir(Path(cfg.run_dir))
    write_config(run, cfg)
    handler = attach_run_log(run)
    update_summary(run, status="running", stage="eval", run_dir=str(run.path), started_at=_now(),
                   parent_run=cfg.parent_run, **provenance())
    try:
        report = evaluate(cfg, run, subjects_of_config(cfg))
    except BaseException as err:
        status = "interrupted" if isinstance(err, (KeyboardInterrupt, Interrupted)) else "failed"
        update_summary(run, status=status, error=_one_line_error(err), ended_at=_now())
        raise
    finally:
        detach_run_log(handler)
    update_summary(run, status="finished", ended_at=_now())
    return report


def _train(cfg: RunConfig, user_overrides: list[str], chained: bool) -> list[RunConfig]:
    """Train in this process: the chain's links one after another, or the one stage. Returns what was run."""
    path = Path(cfg.run_dir)
    if not chained:
        validate(cfg)
        run_stage(cfg)
        return [cfg]
    if launched_run_dir() is None:
        check_run_dir(path, cfg.resume)
    links = chain_configs(cfg, user_overrides, path)
    run_chain(cfg, links, path)
    return links


def _train_as_rank(cfg: RunConfig, user_overrides: list[str], chained: bool) -> list[RunConfig]:
    """One rank of a launched job: join the process group, train, leave the group cleanly (ZeRO-3 hangs otherwise)."""
    if not is_main_process():
        logging.getLogger().setLevel(logging.WARNING)  # one console log per job, from rank 0
    if not cfg.resume and is_finished(Path(cfg.run_dir)):  # launch/command.sh started again by hand
        raise ConfigError(f"run_dir={cfg.run_dir} holds a finished run and is never overwritten; add resume=true to "
                          f"the command to continue it, or change its run_dir.")
    init_process_group(uses_cuda(cfg))
    try:
        return _train(cfg, user_overrides, chained)
    finally:
        shutdown_process_group()


def _launch(cfg: RunConfig, user_overrides: list[str], chained: bool) -> list[RunConfig]:
    """Check everything the ranks will run, then start them; the run dir is fixed here, once, for all ranks."""
    path = Path(cfg.run_dir)
    secondary = is_secondary_machine(cfg)
    if not secondary:
        check_run_dir(path, cfg.resume)
    if chained:
        links = chain_configs(cfg, user_overrides, path)
        _pending_links(cfg, links)  # validates every link that will run
    else:
        validate(cfg)
        links = [cfg]
    if not secondary:  # the ranks build their trainers from the plan made here (alignment/plan/resolved.py)
        for index, link in enumerate(links):
            write_plan(Path(link.run_dir), plan_of(link, links[index - 1] if index > 0 else None))
    try:
        launch(cfg, user_overrides, uses_cuda(cfg))
    except LaunchFailed:
        summary = read_summary(path) or {}
        if summary.get("status") == "interrupted":  # the ranks stopped on a signal, with a checkpoint
            raise Interrupted(summary.get("signal") or "a signal", summary.get("interrupted_at_step"),
                              summary.get("last_complete_checkpoint")) from None
        if not secondary and summary.get("status") in (None, "created", "running"):
            update_summary(RunDir(path), status="failed", ended_at=_now(),
                           error="a launched rank failed before the run finished; see run.log and the console")
        raise
    return links


def run_member(cfg: RunConfig, user_overrides: list[str], member_dir: Path, number: int) -> float:
    """One --multirun member: skipped when finished, resumed when unfinished; a failure is recorded, not raised.

    Returns the member's value of cfg.objective (NaN when it failed): what a search sweeper maximises.
    """
    state = member_state(member_dir)
    if state == "finished":
        log.info("sweep member %d (%s) already finished in %s: skipped", number, " ".join(user_overrides), member_dir)
        return objective_value(member_dir, cfg.objective)
    if state == "unfinished":
        log.info("sweep member %d: resuming the unfinished run in %s", number, member_dir)
        cfg = freeze(dataclasses.replace(cfg, resume=True))
    # Trackers group the members by sweep and name each by its overrides (inherited by launched ranks).
    os.environ[SWEEP_GROUP_ENV], os.environ[MEMBER_LABEL_ENV] = current_sweep_name(), member_label(user_overrides)
    try:
        run(cfg, user_overrides, member_dir)
    except Interrupted:
        raise  # SIGTERM/SIGINT stops the sweep; the same command later resumes this member and runs the rest
    except Exception as err:  # ConfigError, a failed launch, NaN, OOM: this member fails, the sweep goes on
        log.error("sweep member %d (%s) failed: %s: %s", number, " ".join(user_overrides), type(err).__name__, err)
        if (read_summary(member_dir) or {}).get("status") != "failed":
            update_summary(RunDir(member_dir), status="failed", error=f"{type(err).__name__}: {err}", ended_at=_now())
    record_member(member_dir, user_overrides, number)
    return objective_value(member_dir, cfg.objective)


__all__ = ["ConfigError", "StageOutcome", "chain_configs", "run", "run_chain", "run_stage"]
