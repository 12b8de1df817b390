"""One member of a parallel sweep as its own process: `python -m alignment <member overrides>`, told by the
environment which member it is, with its console lines relayed to the sweep's console under the member's name.

The member process runs the member exactly as the basic launcher runs it in-process (alignment.runner.run_member:
a finished member skipped, an unfinished one resumed, a failure recorded in its summary.json rather than raised),
so both launchers leave the same member dirs behind and the sweep summary reads them the same way.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from alignment.records.console import relay_lines
from alignment.records.rundir import RunDir, read_summary, update_summary
from alignment.sweep.sweeps import record_member

# JSON {"dir", "number", "overrides"}: set by the parallel launcher for the member process it starts, read (and
# removed, so that ranks the member launches do not take themselves for members) by alignment.runner.run.
MEMBER_ENV = "ALIGNMENT_PARALLEL_MEMBER"
EXIT_INTERRUPTED = 75  # alignment.runtime.preemption.EXIT_INTERRUPTED (not imported: that module loads transformers)


@dataclass(frozen=True)
class Member:
    dir: Path
    number: int
    overrides: list[str]  # as the sweep composed them: what the summary records as the member's swept values


def parallel_member() -> Member | None:
    """In a member process of hydra/launcher=parallel: which member it is (once; the variable is removed)."""
    given = os.environ.pop(MEMBER_ENV, None)
    if not given:
        return None
    fields = json.loads(given)
    return Member(Path(fields["dir"]), int(fields["number"]), list(fields["overrides"]))


def member_command(overrides: list[str]) -> list[str]:
    """The member's own command: its overrides without the sweep's launcher settings (it runs as a single run)."""
    own = [o for o in overrides if not o.lstrip("+~").startswith(("hydra/launcher=", "hydra.launcher.",
                                                                  "hydra/sweeper=", "hydra.sweeper."))]
    return [sys.executable, "-m", "alignment", *own]


class MemberProcess:
    """A started member: its process and the threads relaying its stdout and stderr line by line, prefixed."""

    def __init__(self, member: Member, command: list[str], env: dict[str, str], prefix: str, cwd: Path | None = None):
        from alignment.runtime.preemption import die_with_parent  # here: importing it loads transformers

        self.member, self.prefix = member, prefix
        handoff = {MEMBER_ENV: json.dumps({"dir": str(member.dir), "number": member.number,
                                           "overrides": member.overrides})}
        # Its own session: a Ctrl-C on the terminal reaches the sweep once, which passes it on to every member
        # (each then checkpoints once); and the member dies with the sweep however the sweep ends.
        self.process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **env, **handoff}, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True, preexec_fn=die_with_parent)
        self.relays = [threading.Thread(target=relay_lines, args=(stream, sink, prefix), daemon=True)
                       for stream, sink in ((self.process.stdout, sys.stdout), (self.process.stderr, sys.stderr))]
        for relay in self.relays:
            relay.start()

    def poll(self) -> int | None:
        returncode = self.process.poll()
        if returncode is not None:
            for relay in self.relays:  # every line the member wrote is out before its end is reported
                relay.join()
        return returncode


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def settle(member: Member, returncode: int) -> None:
    """After the member process ended: a process that died without recording its end (killed, out of memory, a
    crash outside the run) leaves its member marked failed with the exit code, as run_member marks a failure."""
    summary = read_summary(member.dir) or {}
    if returncode not in (0, EXIT_INTERRUPTED) and summary.get("status") not in ("failed", "finished"):
        member.dir.mkdir(parents=True, exist_ok=True)
        update_summary(RunDir(member.dir), status="failed", ended_at=_now(),
                       error=f"the member process exited with code {returncode}; see its console lines")
    if returncode != 0 and not summary.get("sweep"):
        record_member(member.dir, member.overrides, member.number)
