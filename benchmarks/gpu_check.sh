#!/usr/bin/env bash
# One command to check the library on a GPU (issue 17): tests on the device in fp32 and bf16, the
# pruned-pass and buffer benchmarks, and the 12-layer connection search at 2^17 tokens.
#
#   bash benchmarks/gpu_check.sh                    # CUDA, full sizes (< 8 min on one H100)
#   bash benchmarks/gpu_check.sh --device cpu --quick   # small sizes, any machine (~3 min)
#
# Options:
#   --device DEV      cuda (default), cuda:1, cpu
#   --quick           small sizes (default suite, tiny connection search) for a CPU smoke run
#   --dtype DT        dtype of the benchmarks: fp32 (default) or bf16 (the tests run both)
#   --log-dir DIR     where stage logs and results.jsonl go
#                     (default: $OUT/gpu_check if $OUT is set, else /tmp/scae_gpu_check)
#   --only LIST       comma-separated stages to run (default: all), from
#                     env,tests-fp32,tests-bf16,pruned,buffer,search
#   --budget S        total seconds for all stages (default 465; 1200 with --quick); each stage's timeout is its own
#                     limit or what is left of the budget, whichever is smaller
#   --scale X         multiply every stage limit and the budget by X (a slower card)
#
# Output: one JSON line per figure on stdout (each benchmark row, each test stage's counts, one
# line per stage with its status and seconds, and a final summary line); everything else goes to
# the log directory. Exit status: 0 when every stage passed, 1 otherwise. Each stage has its own
# timeout, so one hang costs that stage only. No network is used: set HF_HUB_OFFLINE=1 (done
# here) and, for the embedded-model buffer case, SCAE_CACHE to a folder holding a prebuilt
# embedded model (python -m dictionary_learning.embedded); without it that case is skipped.
set -u -o pipefail

DEVICE=cuda QUICK=0 DTYPE=fp32 ONLY="" SCALE=1 BUDGET=""
LOG_DIR="${OUT:+$OUT/gpu_check}"
LOG_DIR="${LOG_DIR:-/tmp/scae_gpu_check}"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --log-dir) LOG_DIR="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --scale) SCALE="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
# 470 s of stages + up to 15 s of kill grace stays under 8 min; the CPU smoke run gets 20 min
[ -n "$BUDGET" ] || { [ "$QUICK" = 1 ] && BUDGET=1200 || BUDGET=465; }
case "$DTYPE" in fp32|bf16) ;; *) echo "gpu_check.sh: --dtype must be fp32 or bf16" >&2; exit 2 ;; esac

cd "$(dirname "$0")/.." || exit 2
mkdir -p "$LOG_DIR" || exit 2
RESULTS="$LOG_DIR/results.jsonl"
: > "$RESULTS"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
FAILED=()
T_START=$(date +%s)

emit() {  # a JSON line to stdout and results.jsonl
  echo "$1"
  echo "$1" >> "$RESULTS"
}

wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

# run_stage NAME TIMEOUT_S CMD...: runs CMD with a timeout, logs to NAME.log, passes its JSON lines
# through, and records a status line.
run_stage() {
  local name="$1" limit="$2"; shift 2
  wanted "$name" || return 0
  local left=$(( $("$PY" -c "print(int($BUDGET * $SCALE))") - ($(date +%s) - T_START) ))
  limit=$("$PY" -c "print(max(1, min(int($limit * $SCALE), $left)))")
  local log="$LOG_DIR/$name.log" t0 rc
  t0=$(date +%s)
  echo "# $name: $* (timeout ${limit}s)" > "$log"
  timeout --kill-after=15 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  grep -E '^\{.*\}$' "$log" | while IFS= read -r line; do emit "$line"; done
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; elif [ "$rc" -ne 0 ]; then status=fail; fi
  [ "$status" = ok ] || FAILED+=("$name")
  emit "{\"stage\": \"$name\", \"status\": \"$status\", \"exit\": $rc, \"seconds\": $(( $(date +%s) - t0 )), \"timeout_s\": $limit, \"log\": \"$log\"}"
  if [ "$status" != ok ]; then tail -n 25 "$log" | sed "s/^/[$name] /" >&2; fi
}

# pytest stage: counts from its junit xml as one JSON line
run_tests() {
  local name="$1" dtype="$2" limit="$3"
  wanted "$name" || return 0
  local xml="$LOG_DIR/$name.xml"
  rm -f "$xml"
  SCAE_TEST_DEVICE="$DEVICE" SCAE_TEST_DTYPE="$dtype" run_stage "$name" "$limit" \
    "$PY" -m pytest tests/test_on_device.py -p no:cacheprovider -o addopts="" -q -rfE \
    --junitxml="$xml"
  "$PY" - "$xml" "$name" "$DEVICE" "$dtype" >> "$LOG_DIR/$name.log" 2>&1 <<'EOF' || true
import json, sys, xml.etree.ElementTree as ET
path, name, device, dtype = sys.argv[1:]
try:
    s = ET.parse(path).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    row = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    row["seconds"] = float(s.get("time", 0))
except Exception as e:  # no xml: pytest did not finish (see the stage line)
    row = {"error": f"no junit xml: {e}"}
print(json.dumps({"tests": name, "device": device, "dtype": dtype, **row}))
EOF
  tail -n 1 "$LOG_DIR/$name.log" | grep -E '^\{' | while IFS= read -r line; do emit "$line"; done
}

# --------------------------------------------------------------------------- stages

run_stage env 60 "$PY" - "$DEVICE" <<'EOF'
import json, os, sys
import torch
device = torch.device(sys.argv[1])
row = {"env": "torch", "torch": torch.__version__, "device": str(device),
       "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
if device.type == "cuda":
    if not torch.cuda.is_available():
        print(json.dumps(row))
        sys.exit(f"--device {device} but torch.cuda.is_available() is False")
    p = torch.cuda.get_device_properties(device)
    row.update(gpu=p.name, gpu_mem_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
def absent(mods):
    out = []
    for mod in mods:
        try:
            __import__(mod)
        except Exception as e:
            out.append(f"{mod} ({type(e).__name__})")
    return out
# the stages import these; the others are reported (the library imports them lazily)
missing = absent(("nnsight", "transformers", "tokenizers", "tqdm", "pytest"))
row["missing_packages"] = missing
row["missing_optional"] = absent(("datasets", "einops", "matplotlib", "wandb"))
import dictionary_learning.sparse_ops as so
for dt in (torch.float32, torch.float64):
    for k in ("csr", "embedding_bag"):
        row[f"{k}_{str(dt).split('.')[-1]}"] = so.kernel_available(k, device.type, dt)
print(json.dumps(row))
sys.exit(1 if missing else 0)
EOF

if [ "$QUICK" = 1 ]; then
  run_tests tests-fp32 fp32 240
  run_tests tests-bf16 bf16 240
  run_stage pruned 240 "$PY" benchmarks/pruned_forward.py --cases default --repeats 1 \
    --device "$DEVICE" --dtype "$DTYPE"
  run_stage buffer 240 "$PY" benchmarks/buffer_throughput.py --cases random-gpt2-small \
    --small-contexts 2 --repeats 1 --device "$DEVICE" --dtype "$DTYPE"
  run_stage search 240 "$PY" benchmarks/connection_search.py --layers 2 --F 1024 --d 128 \
    --tokens 2048,4096 --device "$DEVICE" --dtype "$DTYPE"
else
  # expected on one H100: tests 2 x ~40 s, pruned ~90 s, buffer ~40 s, search ~60 s; the stage
  # limits are generous and the total budget (465 s) caps them, so the check ends within 8 min
  run_tests tests-fp32 fp32 90
  run_tests tests-bf16 bf16 90
  run_stage pruned 180 "$PY" benchmarks/pruned_forward.py --cases g12k-4k,g24k-4k --repeats 3 \
    --device "$DEVICE" --dtype "$DTYPE"
  BUF_CASES=random-gpt2-small
  if ! wanted buffer; then :
  elif "$PY" -c "import sys; from dictionary_learning.embedded import embedded_model_dir as d; \
sys.exit(0 if (d() / 'metrics.json').is_file() else 1)" 2>/dev/null; then
    BUF_CASES="embedded,$BUF_CASES"
  else
    emit '{"stage": "buffer-embedded", "status": "skipped", "why": "no prebuilt embedded model in $SCAE_CACHE"}'
  fi
  run_stage buffer 90 "$PY" benchmarks/buffer_throughput.py --cases "$BUF_CASES" \
    --small-contexts 256 --repeats 3 --device "$DEVICE" --dtype "$DTYPE"
  # an 8 GiB importance budget: 8x fewer blocks (Python loop turns) than the 1 GiB default
  run_stage search 150 "$PY" benchmarks/connection_search.py --layers 12 --F 12288 \
    --tokens 131072 --budget-gb 8 --device "$DEVICE" --dtype "$DTYPE"
fi

STATUS=pass
[ ${#FAILED[@]} -eq 0 ] || STATUS=fail
FAILED_JSON=""
[ ${#FAILED[@]} -eq 0 ] || FAILED_JSON=$(printf '"%s",' "${FAILED[@]}")
emit "{\"gpu_check\": \"$STATUS\", \"device\": \"$DEVICE\", \"quick\": $QUICK, \"failed\": [${FAILED_JSON%,}], \"seconds\": $(( $(date +%s) - T_START )), \"log_dir\": \"$LOG_DIR\"}"
[ "$STATUS" = pass ]
