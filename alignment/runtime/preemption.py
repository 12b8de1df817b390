"""SIGTERM and SIGINT: stop at the next step boundary, write a complete checkpoint, exit with EXIT_INTERRUPTED.

SLURM preemption, `scancel` and a job's time limit send SIGTERM, then SIGKILL after the cluster's KillWait (30 s by
default); Ctrl-C sends SIGINT. On the first signal a training process finishes the optimizer step it is in, saves
a checkpoint (marked COMPLETE like every other), marks its summary `interrupted` with the step, and exits with
EXIT_INTERRUPTED, which launchers/slurm.sbatch answers with a requeue; the requeued job resumes by itself.

- Every rank of a multi-process run must stop at the same step (saving is a collective under FSDP and ZeRO-3),
  so after each step the ranks agree on whether any of them was signalled (one all-reduce of one number).
- `preemption.grace_s` bounds the wait: when no checkpoint is complete that long after the signal (a step
  longer than the grace period), the process exits anyway; the newest complete checkpoint is still there.
- Outside the training loop (loading, preparing data, saving the final model, evaluating) there is no step to
  finish: the signal interrupts at once, and resume redoes that phase.
- The same signal arriving twice within DUPLICATE_WINDOW_S counts once (the launcher forwards what the scheduler
  also delivered to the ranks); a later second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from transformers import TrainerCallback

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: a temporary failure, to be retried (sbatch requeues on it)
DUPLICATE_WINDOW_S = 5.0
HANDLED = (signal.SIGTERM, signal.SIGINT)


FAULT_ENV = "ALIGNMENT_FAULT_AT"


def phase_boundary(name: str) -> None:
    """A named point between two phases of a run (`sft:trained`, `dpo:saved`, `metrics_rewrite`, ...). The kill-matrix
    tests set ALIGNMENT_FAULT_AT=<name> to kill the process there with SIGKILL, as a node failure would."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class Interrupted(Exception):
    """The run was stopped by a signal; its state is resumable (summary `interrupted`)."""

    def __init__(self, signal_name: str, step: int | None = None, checkpoint: str | None = None):
        where = f" after step {step}, checkpoint {checkpoint}" if step is not None else ""
        super().__init__(f"stopped by {signal_name}{where}; continue with resume=true")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


_ACTIVE: "StopRequest | None" = None


def active_request() -> "StopRequest | None":
    """The stop request installed for this process's command, if any."""
    return _ACTIVE


class StopRequest:
    """The signal state of this process: installed around a stage, read by the StopAtStepBoundary callback."""

    def __init__(self, grace_s: float, on_timeout: Callable[[str], None] | None = None):
        self.grace_s = grace_s
        self.on_timeout = on_timeout
        self.signal_name: str | None = None
        self.received_at: float | None = None
        self.in_training_loop = False
        self._previous: dict[int, object] = {}
        self._watchdog: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> "StopRequest":
        global _ACTIVE
        if threading.current_thread() is threading.main_thread():
            for number in HANDLED:
                self._previous[number] = signal.signal(number, self._handle)
        _ACTIVE = self
        return self

    def uninstall(self) -> None:
        global _ACTIVE
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if _ACTIVE is self:
            _ACTIVE = None

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        now = time.monotonic()
        if self.requested:
            if now - (self.received_at or now) < DUPLICATE_WINDOW_S:
                return  # the same stop, delivered twice (scheduler and launcher)
            log.error("second %s: exiting at once, without a checkpoint", name)
            os._exit(EXIT_INTERRUPTED)
        self.signal_name, self.received_at = name, now
        if not self.in_training_loop:
            raise Interrupted(name)
        log.warning("%s received: stopping at the end of this step and saving a checkpoint (grace %s s)", name,
                    self.grace_s)
        self._watchdog = threading.Timer(self.grace_s, self._out_of_time)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _out_of_time(self) -> None:
        message = (f"no checkpoint completed within preemption.grace_s={self.grace_s} s of {self.signal_name}; "
                   f"exiting, the newest complete checkpoint is kept")
        log.error(message)
        if self.on_timeout is not None:
            self.on_timeout(message)
        os._exit(EXIT_INTERRUPTED)

    def checkpoint_done(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()


@contextmanager
def handling_signals(grace_s: float) -> Iterator[StopRequest]:
    """SIGTERM/SIGINT handled for the block (a whole command: its stages, chain links and evaluations)."""
    request = StopRequest(grace_s).install()
    try:
        yield request
    finally:
        request.uninstall()


def _any_rank_requested(local: bool) -> bool:
    """Whether any rank was signalled: the same answer on every rank, so they stop at the same step."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1 if local else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class StopAtStepBoundary(TrainerCallback):
    """Turns a stop request into the trainer's own save-and-stop at the end of the current optimizer step."""

    def __init__(self, request: StopRequest, stage: str = ""):
        self.request, self.stage = request, stage
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.request.in_training_loop = True

    def on_step_end(self, args, state, control, **kwargs):
        phase_boundary(f"{self.stage}:step-{state.global_step}")
        if _any_rank_requested(self.request.requested):
            if not self.request.requested:  # another rank was signalled: this one stops with it
                self.request.signal_name, self.request.received_at = "SIGTERM (another rank)", time.monotonic()
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_save(self, args, state, control, **kwargs):
        if self.stopped_at is not None:
            self.request.checkpoint_done()

    def on_train_end(self, args, state, control, **kwargs):
        self.request.in_training_loop = False


def forward_to(child_pid: int, grace_s: float) -> Callable[[], None]:
    """In a launching process: pass SIGTERM/SIGINT on to the launcher child (which passes it to every rank), and
    kill the child's whole process group if it is still there grace_s + 15 s later. Returns the uninstaller."""
    previous = {}
    state = {"first": None}

    def handle(number, frame):
        now = time.monotonic()
        if state["first"] is not None and now - state["first"] < DUPLICATE_WINDOW_S:
            return
        repeated = state["first"] is not None
        state["first"] = state["first"] or now
        try:
            os.kill(child_pid, signal.SIGKILL if repeated else number)
        except ProcessLookupError:
            return
        if repeated:
            _kill_group(child_pid)
            return
        timer = threading.Timer(grace_s + 15, _kill_group, args=(child_pid,))
        timer.daemon = True
        timer.start()

    for number in HANDLED:
        previous[number] = signal.signal(number, handle)

    def uninstall() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    return uninstall


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: deliver `sig` to this process when its parent dies (a launcher killed with SIGKILL leaves no rank
    training on as an orphan). A no-op elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass
