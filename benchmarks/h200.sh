#!/usr/bin/env bash
# The accelerator measurement of docs/performance.md, as run on one H200 (`device` tool):
#   bash benchmarks/h200.sh OUT_DIR MODELS BATCHES [extra side_by_side.py arguments]
# e.g. bash benchmarks/h200.sh out vit_base,vit_large vit_base=256,vit_large=256 \
#          --variants 'attention_impl=cudnn;attention_impl=xla' --profile_dir out/prof
# The machine has jax 0.11.2, flax 0.12.10, torch and transformers but not ml_collections (nor
# TensorFlow, which the benchmark never imports). Bring its wheel (and no flax: 0.12.8 does not
# import under jax 0.11.2), ignored by git, into /tmp/site there:
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#       --python-version 3.12 --implementation cp -d .whl ml-collections==1.1.0
set -uo pipefail
out=$1 models=$2 batches=$3
shift 3
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,driver_version \
  --format=csv | tee "$out/gpu.txt"
python3 benchmarks/side_by_side.py --models "$models" --batch "$batches" --dtype bfloat16 \
  --json "$out/side_by_side.json" "$@" 2>&1 | grep --line-buffered -v "^W0000\|^I0000\|absl::InitializeLog" \
  | tee "$out/log.txt"
rc=${PIPESTATUS[0]}
# Profiles: keep the perfetto traces flat in OUT (the device tool returns 2 folders deep).
for f in $(find "$out" -mindepth 3 -name perfetto_trace.json.gz 2>/dev/null); do
  cp "$f" "$out/$(echo "${f#"$out"/}" | cut -d/ -f2 | tr -d '\n' | tr -c 'A-Za-z0-9._-' '_').perfetto.json.gz"
done
exit "$rc"
