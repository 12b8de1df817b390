"""A sweep dir's name: from the command's overrides (secrets masked), the same for the same command."""

from __future__ import annotations
import hashlib
import os
import re
import sys
import time
from alignment.secrets import declare_named_in, redact_text
from alignment.config.argv import cli_overrides


# The sweep's name, fixed once per command: Hydra resolves hydra.sweep.dir again inside every member, with
# that member's own overrides, so the name must not be derived from what the resolver sees there.
SWEEP_NAME_ENV = "ALIGNMENT_SWEEP_NAME"


def sweep_name(overrides) -> str:
    """`beta=0.05,0.1 stage=dpo` → 'beta-0.05-0.1_stage-dpo-1a2b3c4d': readable, and the same for the same command.

    Secrets in override values (a URL's password, a key) are masked before the name is made, and the hash is of the
    masked command too: a secret never reaches the directory's name, and a rotated key finds the same sweep dir.
    """
    declare_named_in(overrides)  # `*_env=NAME`: NAME's value is masked here already, before validation declares it
    items = sorted(redact_text(str(o)) for o in overrides if not str(o).startswith(("hydra.", "hydra/")))
    # Only characters Hydra accepts unquoted in an override value: the dir is passed on as run_dir=... to ranks.
    readable = re.sub(r"[^A-Za-z0-9_.+-]+", "-", "_".join(items))[:80] or "defaults"
    return f"{readable}-{hashlib.sha1(' '.join(items).encode()).hexdigest()[:8]}"


def current_sweep_name() -> str:
    """The name this command's sweep dir gets (`${sweep_name:}` in alignment/conf/config.yaml); set once per command.

    A search sweeper (optuna) samples new values on every run, so the same command is not the same sweep:
    its dir also carries the start time.
    """
    if not os.environ.get(SWEEP_NAME_ENV):

        overrides = cli_overrides(sys.argv[1:]) or []
        name = sweep_name(overrides)
        if any(o.startswith("hydra/sweeper=") and not o.endswith("=basic") for o in overrides):
            name = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{name}"
        os.environ[SWEEP_NAME_ENV] = name
    return os.environ[SWEEP_NAME_ENV]
