#!/usr/bin/env bash
# The GPU run in one script: ≤ 8 minutes on a bare H200 machine (no network), its installs included.
#
#   bash benchmarks/gpu_check.sh --prepare   # here, once: data + wheels into the git-ignored device_data/
#   bash benchmarks/gpu_check.sh             # there (carry device_data/): writes one JSON per figure to $OUT
#   bash benchmarks/gpu_check.sh --tiny      # CPU, a few hundred images: the same steps (tests/test_gpu_check.py)
#
# --prepare copies the compact CIFAR-10 files (train + test JPEG blobs and indexes, 53.6 MiB) from
# ../shared/data (or $INFLUENCE_LENS_DATA) into device_data/, and downloads the pure-Python wheels
# the device image lacks (cleanlab, its termcolor, captum) into device_data/wheels/. The device
# machine has PyTorch (CUDA), numpy, pandas, scikit-learn, Pillow, tqdm, matplotlib and pytest, and
# no network: the engine is installed with `pip install --no-deps --no-build-isolation -e .` (its
# dashboard dependencies, streamlit and plotly, are not needed here) and the wheels from
# device_data/wheels with --no-index. With no device_data/wheels it runs `pip install -e ".[bench]"`.
# Through the device tool: run(command="bash benchmarks/gpu_check.sh", carry=["device_data"], timeout_s=600).
#
# Steps, each under its own time limit so that one overrun leaves the others' figures:
#   1. the `gpu`-marked tests                                      → $OUT/gpu_tests.json
#   2. benchmarks/speed.py: ResNet-18, 50k CIFAR-10, ours vs torch.func vs Captum (samples/s, peak
#      memory, ratio to a plain pass)                                → $OUT/speed.json
#   3. benchmarks/detection.py: 50k CIFAR-10, 20% symmetric noise, ResNet-18 12 epochs; loss,
#      cleanlab, tracin, vm-loss, fvm (AUROC, relabel top-1, seconds) → $OUT/detection.json (+ .md)
#   and $OUT/environment.json (machine, versions, seconds per step, exit codes).
set -uo pipefail

cd "$(dirname "$0")/.."
MODE=full
case "${1:-}" in
  --prepare) MODE=prepare ;;
  --tiny) MODE=tiny ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--prepare | --tiny]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
DATA=${GPU_CHECK_DATA:-device_data}

if [ "$MODE" = prepare ]; then
  SOURCE=${INFLUENCE_LENS_DATA:-../shared/data}
  mkdir -p "$DATA/wheels" || exit 1
  for split in train test; do
    install -m 644 "$SOURCE/cifar10_${split}_jpegq75.bin" "$SOURCE/cifar10_${split}_jpegq75_index.npz" "$DATA/" || exit 1
  done
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$DATA/wheels" cleanlab termcolor captum || exit 1
  du -sh "$DATA"
  exit 0
fi

if [ "$MODE" = tiny ]; then
  OUT=${OUT:-benchmarks/out/gpu_check_tiny}
  DATA=${GPU_CHECK_DATA:-${INFLUENCE_LENS_DATA:-../shared/data}}
  DEVICE=cpu; SIZE=tiny; SPEED=(--tiny --skip-pipeline --skip-cleanlab)
  LIMIT_TESTS=120; LIMIT_SPEED=300; LIMIT_DETECTION=300
else
  OUT=${OUT:-benchmarks/out/gpu_check}
  # cleanlab's cost is in the detection run; one repeat per measurement keeps the speed step near 2 min
  DEVICE=cuda; SIZE=gpu; SPEED=(--skip-pipeline --skip-cleanlab --repeats 1)
  # Not yet run on a GPU: the limits (installs 45 s included) add up to 7.75 min, so the script ends
  # inside 8 minutes whatever a step does; a step cut short is reported with exit code 124.
  LIMIT_TESTS=60; LIMIT_SPEED=160; LIMIT_DETECTION=200
fi
mkdir -p "$OUT"
LOGS=$(mktemp -d)
export PYTHONUNBUFFERED=1 INFLUENCE_LENS_DATA="$DATA"
STARTED=$(date +%s)
declare -A SECONDS_OF RC_OF

step() {  # step NAME LIMIT COMMAND...: run under a time limit, keep its output and exit code
  local name=$1 limit=$2; shift 2
  local start; start=$(date +%s)
  echo "== $name (limit ${limit}s): $*" >&2
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.out" 2>"$LOGS/$name.err"
  RC_OF[$name]=$?
  SECONDS_OF[$name]=$(( $(date +%s) - start ))
  tail -n 5 "$LOGS/$name.err" >&2
}

# 0. installs (full mode: the machine is bare; tiny mode runs in the test's own environment)
if [ "$MODE" = full ]; then
  if [ -d "$DATA/wheels" ]; then
    step install 45 bash -c "$PYTHON -m pip install -q --no-deps --no-build-isolation -e . && \
      $PYTHON -m pip install -q --no-index --find-links '$DATA/wheels' cleanlab captum"
  else
    step install 45 "$PYTHON" -m pip install -q -e ".[bench]"
  fi
fi

# 1. the gpu-marked tests (on the CPU they skip: the step still runs)
step gpu_tests "$LIMIT_TESTS" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider \
  --junitxml="$LOGS/gpu_tests.xml" tests/test_gpu.py tests/test_distributed.py

# 2. speed: ours vs torch.func vs Captum
step speed "$LIMIT_SPEED" "$PYTHON" benchmarks/speed.py --data-root "$DATA" --device "$DEVICE" "${SPEED[@]}"

# 3. detection: 50k CIFAR-10 with 20% symmetric noise (tiny: a few hundred rows)
step detection "$LIMIT_DETECTION" "$PYTHON" benchmarks/detection.py --setting cifar-sym20 --size "$SIZE" \
  --device "$DEVICE" --data-root "$DATA" --methods loss,cleanlab,tracin,vm-loss,fvm --out "$LOGS/detection"

# One JSON per figure, from the steps' JSON lines and the test report.
"$PYTHON" - "$LOGS" "$OUT" "$MODE" "$(( $(date +%s) - STARTED ))" \
  "$(for k in "${!RC_OF[@]}"; do echo "$k=${RC_OF[$k]}:${SECONDS_OF[$k]}"; done)" <<'PY'
import json, platform, sys, xml.etree.ElementTree as ET
from pathlib import Path

logs, out, mode, total, steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]


def json_lines(path):
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return [r for r in rows if isinstance(r, dict)]


status = {k: {"exit_code": int(v.split(":")[0]), "seconds": int(v.split(":")[1])}
          for k, v in (item.split("=") for item in steps.split())}
tests = []
if (logs / "gpu_tests.xml").exists():
    for case in ET.parse(logs / "gpu_tests.xml").iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0))})
figures = {
    "gpu_tests.json": {"step": status.get("gpu_tests"), "tests": tests},
    "speed.json": {"step": status.get("speed"), "measurements": json_lines(logs / "speed.out")},
    "detection.json": {"step": status.get("detection"), "rows": [
        {k: r.get(k) for k in ("kind", "method", "n", "auroc", "ap", "relabel_top1", "relabel_n", "seconds",
                               "prepare_seconds", "score_seconds", "test_accuracy", "validation_accuracy",
                               "model", "device", "epochs", "error") if r.get(k) is not None}
        for r in json_lines(logs / "detection.out")]},
}
try:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
except Exception as exc:  # the environment report must come back even if torch does not import
    gpu, versions = None, {"torch": f"not importable: {exc}"}
figures["environment.json"] = {"mode": mode, "gpu": gpu, "python": platform.python_version(), **versions,
                               "total_seconds": total, "steps": status}
for name, payload in figures.items():
    (out / name).write_text(json.dumps(payload, indent=1) + "\n")
for table in (logs / "detection").glob("*.md"):
    if table.name != "summary.md":
        (out / "detection.md").write_text(table.read_text())
print(json.dumps({"out": str(out), "total_seconds": total, "steps": status}))
PY
for name in install gpu_tests speed detection; do
  if [ -n "${RC_OF[$name]:-}" ] && [ "${RC_OF[$name]}" != 0 ]; then
    echo "gpu_check: step $name exited ${RC_OF[$name]}; its stderr:" >&2
    tail -n 20 "$LOGS/$name.err" >&2
    rc=1
  fi
done
exit ${rc:-0}
