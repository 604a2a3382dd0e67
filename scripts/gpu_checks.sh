#!/usr/bin/env bash
# The checks a CPU-only CI cannot run, in one go on a GPU node, most important first, inside a
# time budget (a short reservation):   bash scripts/gpu_checks.sh OUT_DIR [SECONDS=540]
#   1. attention alone: FlexAttention with ALiBi (also on FlashAttention-4's kernels when
#      flash-attn-4 and torch >= 2.9 are installed) and SDPA with ALiBi folded into the heads
#      (on each SDPA kernel) against SDPA's causal kernel (each checked against the reference
#      first), the ratio ALiBi costs;
#   2. the FP8 rows and the bf16 rows they are compared with (yamls/benchmarks/h100.yaml, when
#      torchao is installed): the MPT-7B layer shape (8 layers) in bf16 and in FP8, MPT-1B in
#      bf16 and in FP8; losses.txt compares each FP8 row's per-step losses with its bf16 row's
#      and gives the tokens/s ratio;
#   3. the rows of the single-H100 table (yamls/benchmarks/h100.yaml) with the least recent
#      figures, through the real trainer: mpt-1b one micro batch per step (the anchor to
#      compare runs by), the same on cuDNN's ALiBi kernel (impl cudnn, when its frontend is
#      installed), the mpt-1b spec's global batch of 512 in micro batches of 8, 1b with every
#      option off (its losses are compared with mpt-1b's);
#   4. MPT-1B profiled (--profile): the kernels that take the time and the gaps where the GPU
#      waits, with the host ops inside them;
#   5. the rest of the table: 1b accumulating 8 (also on impl cudnn), the spec's global batch
#      in micro batches of 8 on impl cudnn, the 1b spec as written, 1b with the step end beside
#      the update, the 125m spec with every option and without (losses compared step by step),
#      350m, 3b, 3b with activation checkpointing, 1b on folded SDPA, with larger batches, on
#      SDPA's cuDNN kernel and on FlashAttention-4 (when installed); rows left when the time is
#      spent are listed as not run;
#   6. the GPU-only tests.
# OUT_DIR gets gpu.txt (the stack: torch, Composer, streaming, CUDA, cuDNN, GPU, and the named
# stack it matches, or none), stack.json, attention.txt, profile.txt, table.txt, rows.json, losses.txt, tests.txt and logs/
# (each row's whole output).
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT_DIR [SECONDS]}
budget=${2:-540}
tests_s=75  # kept back for step 6
[[ $budget =~ ^[0-9]+$ ]] || { echo "SECONDS must be a whole number, got '$budget'" >&2; exit 2; }
end=$((SECONDS + budget))
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: the script runs from the repository root
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 WANDB_MODE=${WANDB_MODE:-disabled} HF_HUB_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/mpt-train-inductor}

if ! python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_checks.sh: no CUDA GPU visible to torch here; these checks need one" >&2
  exit 2
fi
# The stack first: every figure below was measured on it. stack.json is the records' "stack".
python3 -m mpt_train.compat --stack | tee "$out/gpu.txt"
python3 -m mpt_train.compat --json > "$out/stack.json"
# Records written below name the stack matched here (unless the caller names one).
if [[ -z ${MPT_TRAIN_STACK:-} ]] && name=$(python3 -m mpt_train.compat --name); then
  export MPT_TRAIN_STACK=$name
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/gpu.txt"

# With flash-attn 4 installed and torch >= 2.9 (FlexAttention's BACKEND option), FlexAttention
# can run on FlashAttention-4's CuTe kernels: time that too.
fa4_opts=() fa4_rows=() cudnn_rows=() cudnn_rest=() fp8_rows=() fp8_rest=()
if python3 -c 'import torchao.float8' 2>/dev/null; then  # the fp8 rows need torchao
  fp8_rows=(mpt-7b-8l-fp8 mpt-1b-fp8) fp8_rest=(mpt-7b-8l-fp8-rowwise)
fi
if python3 -c 'import cudnn' 2>/dev/null; then  # impl cudnn needs the cuDNN frontend
  cudnn_rows=(mpt-1b-cudnn) cudnn_rest=(mpt-1b-accum8-cudnn mpt-1b-spec-mb8-cudnn)
fi
if python3 -c 'import sys, torch, flash_attn.cute
sys.exit(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 9))' 2>/dev/null; then
  fa4_opts=(--flex-options '{"BACKEND": "FLASH"}') fa4_rows=(mpt-1b-fa4)
fi
timeout 120 python3 scripts/bench_attention.py --batch 8 --heads 16 --seq 2048 --head-dim 128 \
  ${fa4_opts[@]+"${fa4_opts[@]}"} 2>&1 | tee "$out/attention.txt"

# A part of the table within what is left less KEEP seconds: table JSON KEEP ROW...
table() {
  local json=$1 keep=$2 left
  shift 2
  left=$((end - SECONDS - keep))
  python3 scripts/benchmark_table.py yamls/benchmarks/h100.yaml --only "$@" \
    --budget-s $((left > 0 ? left : 0)) --json "$json" --logs "$out/logs" --record "$out/records" 2>&1 | tee -a "$out/table.txt"
}
: >"$out/table.txt"
table "$out/rows-fp8.json" "$tests_s" mpt-7b-8l mpt-1b ${fp8_rows[@]+"${fp8_rows[@]}"}
table "$out/rows-key.json" "$tests_s" ${cudnn_rows[@]+"${cudnn_rows[@]}"} mpt-1b-spec-mb8 \
  mpt-1b-plain

# The profile gets at most 150 s and only what leaves the tests 60 s more; its Chrome trace
# stays on the node (/tmp/mpt-train-profile), too large to bring back.
left=$((end - SECONDS - tests_s - 60))
if ((left > 60)); then
  timeout $((left < 150 ? left : 150)) python3 scripts/benchmark.py yamls/mpt-1b.yaml \
    global_train_batch_size=6 device_train_microbatch_size=6 --profile /tmp/mpt-train-profile \
    2>&1 | tee "$out/profile.txt"
else
  echo "profile not run: the time budget was spent" | tee "$out/profile.txt"
fi

table "$out/rows-rest.json" "$tests_s" ${fp8_rest[@]+"${fp8_rest[@]}"} mpt-1b-accum8 \
  ${cudnn_rest[@]+"${cudnn_rest[@]}"} \
  mpt-1b-spec mpt-1b-overlap mpt-125m mpt-125m-plain mpt-350m mpt-3b mpt-3b-ac mpt-1b-sdpa \
  mpt-1b-mb8 mpt-1b-mb10 mpt-1b-sdpa-cudnn ${fa4_rows[@]+"${fa4_rows[@]}"}
python3 - "$out"/rows-fp8.json "$out"/rows-key.json "$out"/rows-rest.json >"$out/rows.json" <<'PY'
import json, sys
rows = []
for path in sys.argv[1:]:
    try:
        rows += json.load(open(path))
    except (OSError, ValueError):
        pass
print(json.dumps(rows, indent=1))
PY
rm -f "$out"/rows-fp8.json "$out"/rows-key.json "$out"/rows-rest.json

python3 - "$out/rows.json" <<'PY' 2>&1 | tee "$out/losses.txt"
import json, sys
rows = {r["name"]: r["result"] for r in json.load(open(sys.argv[1]))}
pairs = [("mpt-7b-8l-fp8", "mpt-7b-8l"), ("mpt-1b-fp8", "mpt-1b"),
         ("mpt-7b-8l-fp8-rowwise", "mpt-7b-8l"),
         ("mpt-125m", "mpt-125m-plain"), ("mpt-1b", "mpt-1b-plain"), ("mpt-1b-cudnn", "mpt-1b"),
         ("mpt-1b-accum8-cudnn", "mpt-1b-accum8"), ("mpt-1b-spec-mb8-cudnn", "mpt-1b-spec-mb8")]
for fast, base in pairs:
    a, b = rows.get(fast, {}).get("losses"), rows.get(base, {}).get("losses")
    if not a or not b:
        print(f"{fast}: no pair of losses to compare")
        continue
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f"{fast} vs {base}, per-step loss (same seed, same batches); max |diff| {diff:.4f}")
    if "-fp8" in fast:  # FP8 against bf16: relative loss after warm-up, and the speed-up
        rel = max(abs(x - y) / y for x, y in list(zip(a, b))[4:]) if len(a) > 4 else float("nan")
        speed = rows[fast]["tokens_per_sec"] / rows[base]["tokens_per_sec"]
        print(f"  after step 4: max relative loss diff {100 * rel:.2f}%; tokens/s x{speed:.3f}")
    for step, (x, y) in enumerate(zip(a, b), 1):
        print(f"  step {step:2d}: {x:.4f} {y:.4f}")
PY

left=$((end - SECONDS))
if ((left > 20)); then
  timeout "$left" python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/model/test_backends.py \
    tests/model/test_cudnn_attention.py tests/train/test_perf_options.py \
    tests/train/test_host_waits.py tests/train/test_fp8.py 2>&1 | tee "$out/tests.txt"
else
  echo "GPU tests not run: the time budget was spent" | tee "$out/tests.txt"
fi
