"""Run a parallel sweep's members in their slots: each starts when a slot is free, all are waited for.

SIGTERM/SIGINT: no further member starts; every running member gets the signal once (it stops at a step boundary
with a checkpoint, as a single run does) and is waited for; a second signal later than the duplicate window, or
the grace period running out, kills them. Running the sweep command again resumes them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from alignment.sweep.member_process import Member, MemberProcess
from alignment.sweep.slots import Slot

log = logging.getLogger("alignment")

HANDLED = (signal.SIGTERM, signal.SIGINT)
DUPLICATE_WINDOW_S = 5.0  # as alignment.runtime.preemption: one signal delivered twice counts once
POLL_S = 0.2


@dataclass(frozen=True)
class Planned:
    member: Member
    command: list[str]
    prefix: str
    cwd: Path | None = None  # hydra.job.chdir=true: the member's dir, as the basic launcher would chdir there


@dataclass
class Outcome:
    returncodes: dict[int, int]  # member number → exit code of its process, for every member that ran
    interrupted: str | None      # the signal's name when the sweep was stopped by one


class _Stop:
    """The sweep's signal handling while members run: pass the signal on to every running member, once."""

    def __init__(self, running: Callable[[], list[MemberProcess]], grace_s: float):
        self.running, self.grace_s = running, grace_s
        self.signal_name: str | None = None
        self.first: float | None = None
        self.previous = {number: signal.signal(number, self.handle) for number in HANDLED}

    def handle(self, number, frame) -> None:
        now = time.monotonic()
        if self.first is not None and now - self.first < DUPLICATE_WINDOW_S:
            return
        if self.first is not None:  # asked again: stop waiting for checkpoints
            self.kill_all()
            return
        self.first, self.signal_name = now, signal.Signals(number).name
        log.warning("%s: no further sweep member starts; the running ones checkpoint and stop", self.signal_name)
        for started in self.running():
            try:
                os.kill(started.process.pid, number)
            except ProcessLookupError:
                pass
        timer = threading.Timer(self.grace_s + 15, self.kill_all)
        timer.daemon = True
        timer.start()

    def kill_all(self) -> None:
        for started in self.running():
            try:
                os.killpg(started.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def uninstall(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def run_in_slots(planned: list[Planned], slots: list[Slot], grace_s: float,
                 on_end: Callable[[Member, int], None]) -> Outcome:
    """Start each member in the first free slot, in order; call on_end(member, exit code) as each one ends."""
    waiting = list(planned)
    running: dict[int, tuple[MemberProcess, Slot]] = {}  # member number → its process and slot
    free = list(slots)
    returncodes: dict[int, int] = {}
    stop = _Stop(lambda: [started for started, _ in running.values()], grace_s)
    try:
        while waiting or running:
            while waiting and free and stop.signal_name is None:
                item, slot = waiting.pop(0), free.pop(0)
                log.info("%s starting (slot %d: %s)", item.prefix, slot.index, slot.describe())
                running[item.member.number] = (MemberProcess(item.member, item.command, slot.environment(),
                                                             item.prefix, item.cwd), slot)
            if stop.signal_name is not None:
                waiting.clear()
            for number, (started, slot) in list(running.items()):
                returncode = started.poll()
                if returncode is None:
                    continue
                del running[number]
                free.append(slot)
                free.sort(key=lambda s: s.index)
                returncodes[number] = returncode
                log.info("%s ended (exit code %d)", started.prefix, returncode)
                on_end(started.member, returncode)
            if running:
                time.sleep(POLL_S)
    finally:
        stop.uninstall()
    return Outcome(returncodes, stop.signal_name)
