#!/usr/bin/env bash
# Run every GPU check of inhibmoe_fast in one go on a CUDA machine and collect the results.
#
# Usage: benchmarks/gpu_checks.sh [OUT]     (OUT defaults to $OUT, then ./gpu_results)
#
# Steps, each with a time limit (the limits add up to 13 minutes):
#   1. build: pip install --no-build-isolation --no-deps -e . with the CUDA extension forced on;
#   2. tests: the whole test suite with TRITON_INTERPRET unset, so the Triton kernels are
#      compiled and the tests that need a GPU run on CUDA tensors;
#   3. bench-*: python -m inhibmoe_fast.bench on GPU shapes, torch against triton backends;
#   4. summary.md: GPU name, driver, torch, Triton and CUDA versions, the status and time of
#      every step, the test counts and the benchmark tables.
# Logs, CSV files and plots go under OUT. Every step runs even when an earlier one fails;
# the exit status is 1 when any step failed.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-./gpu_results}}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
unset TRITON_INTERPRET

STEPS_FILE="$OUT/steps.tsv"
printf "step\tstatus\tseconds\n" > "$STEPS_FILE"
failed=0

# run_step NAME LIMIT_SECONDS COMMAND...: run COMMAND with its output in OUT/NAME.log.
run_step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start status
    start=$(date +%s)
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
        status=ok
    else
        local code=$?
        if [ "$code" -eq 124 ]; then status="timed out"; else status="failed (exit $code)"; fi
        failed=1
    fi
    printf "%s\t%s\t%s\n" "$name" "$status" "$(( $(date +%s) - start ))" >> "$STEPS_FILE"
    echo "   $status; log in $OUT/$name.log"
}

run_step build 240 env INHIBMOE_FAST_CUDA=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .

run_step tests 240 "$PYTHON" -m pytest -q -rs tests --junitxml="$OUT/tests.xml"

# The expert-kernel target shape: T = 8192, D = 2048, F = 768, E = 128, k = 8, local inhibition
# with a rank-128 gate, bfloat16, against the reference; the parts alone show the Triton experts
# beside the PyTorch expert products on the same dispatch.
run_step bench-bf16-experts 150 "$PYTHON" -m inhibmoe_fast.bench --device cuda --dtype bfloat16 \
    --tokens 8192 --dim 2048 --hidden 768 --experts 128 --top-k 8 --gate-rank 128 --inhibitions local \
    --baselines reference --backends torch,triton --parts --skip parity,sweep,maxpool,train --no-progress \
    --out "$OUT/bench-bf16-experts"

# A mid-size layer: D = 2048 with a full D x D gate, 64 experts, bfloat16. The other baselines
# (compiled reference, Mixtral-style) run here only; the sweeps are skipped to fit the time limits.
run_step bench-bf16-local 90 "$PYTHON" -m inhibmoe_fast.bench --device cuda --dtype bfloat16 \
    --tokens 16384 --dim 2048 --hidden 1024 --experts 64 --top-k 2 --inhibitions none,local \
    --backends triton --skip parity,sweep,maxpool,train --no-progress --out "$OUT/bench-bf16-local"

# Parity in float64, maxpool_align and the digits training run at their default sizes.
run_step bench-parity-maxpool-train 60 "$PYTHON" -m inhibmoe_fast.bench --device cuda \
    --backends torch,triton,reference --skip layer,sweep --no-progress --out "$OUT/bench-parity-maxpool-train"

"$PYTHON" - "$OUT" <<'PYTHON_SUMMARY' || failed=1
"""Write OUT/summary.md from the step table, the JUnit file and the benchmark CSV files."""
import csv
import glob
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree



def format_cell(value):
    """Return a CSV cell with floats rounded to 4 significant digits."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "." not in value else f"{number:.4g}"


out = sys.argv[1]
lines = ["# inhibmoe_fast GPU checks", ""]

try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout.strip()
except (OSError, subprocess.CalledProcessError) as error:
    gpu = f"nvidia-smi failed: {error}"
versions = {}
try:
    import torch
    versions["torch"] = torch.__version__
    versions["CUDA (torch build)"] = str(torch.version.cuda)
    if torch.cuda.is_available():
        versions["device"] = torch.cuda.get_device_name(0)
except ImportError as error:
    versions["torch"] = f"import failed: {error}"
try:
    import triton
    versions["triton"] = triton.__version__
except ImportError as error:
    versions["triton"] = f"import failed: {error}"
lines += [f"- GPU (name, driver): {gpu}"] + [f"- {name}: {value}" for name, value in versions.items()] + [""]

lines += ["## Steps", "", "| step | status | seconds |", "| --- | --- | --- |"]
with open(os.path.join(out, "steps.tsv")) as handle:
    for row in csv.DictReader(handle, delimiter="\t"):
        lines.append(f"| {row['step']} | {row['status']} | {row['seconds']} |")
lines.append("")

junit = os.path.join(out, "tests.xml")
if os.path.exists(junit):
    root = ElementTree.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: suite.get(key, "0") for key in ("tests", "failures", "errors", "skipped")}
    lines += ["## Tests", "", ", ".join(f"{key}: {value}" for key, value in counts.items()), ""]
    failing = [case for case in suite.iter("testcase")
               if case.find("failure") is not None or case.find("error") is not None]
    for case in failing[:30]:
        lines.append(f"- FAILED {case.get('classname')}::{case.get('name')}")
    if failing:
        lines.append("")

for path in sorted(glob.glob(os.path.join(out, "bench-*", "*.csv"))):
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        continue
    columns = [c for c in rows[0] if c not in ("device", "torch", "date")]
    lines += [f"## {os.path.relpath(path, out)}", "", "| " + " | ".join(columns) + " |",
              "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row[c]) for c in columns) + " |" for row in rows]
    lines.append("")

with open(os.path.join(out, "summary.md"), "w") as handle:
    handle.write("\n".join(lines))
print(f"wrote {os.path.join(out, 'summary.md')}")
PYTHON_SUMMARY

exit "$failed"
