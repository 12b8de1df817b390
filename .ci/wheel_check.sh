#!/usr/bin/env bash
# The release artifacts as a user gets them: build the sdist and, from it, the wheel; install the wheel (not
# editable) into a clean venv; from an unrelated directory run `alignment --help`, a dry run of the 72B QLoRA
# preset and the offline demo. Usage: .ci/wheel_check.sh [a prebuilt .whl to check instead of building one]
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
if [ "${1:-}" ]; then
  WHEEL="$(realpath "$1")"
else
  python3 -m venv "$WORK/build-venv"
  "$WORK/build-venv/bin/pip" install -q build
  "$WORK/build-venv/bin/python" -m build --sdist --wheel --outdir "$WORK/dist" "$REPO"  # the wheel is built from the sdist
  ls -l "$WORK/dist"
  WHEEL="$(ls "$WORK"/dist/*.whl)"
fi
python3 -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
pip install -q torch==2.13.0
pip install -q "$WHEEL"
mkdir "$WORK/elsewhere" && cd "$WORK/elsewhere"  # nothing of the repository on the path
python -c "import alignment, sys; assert '$REPO' not in alignment.__file__, alignment.__file__; print('alignment from', alignment.__file__)"
alignment --help > help.txt && head -3 help.txt  # (a pipe into head would break alignment's output early)
# A dry run plans a run that would download its model and data: HF_HUB_OFFLINE unset (nothing is fetched).
env -u HF_HUB_OFFLINE alignment experiment=qwen72b_qlora_dpo dry_run=true | tail -4
alignment | tail -3
test "$(python -c "import json,glob; print(json.load(open(sorted(glob.glob('outputs/*/*/2-dpo/summary.json'))[-1]))['status'])")" = finished
echo "wheel check: passed"
