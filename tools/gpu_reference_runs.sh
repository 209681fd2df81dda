#!/usr/bin/env bash
# The lent-GPU part of issue 16: Stage-1 searches of the reference models, then Stage-2 ablations
# under their 30% results with the budget-100% result as teacher, in one call of the device tool:
#   run(command="bash tools/gpu_reference_runs.sh", carry=[".whl"], timeout_s=600)
# .whl holds the wheels the GPU image lacks (diffusers, jsonschema and its dependencies for Python
# 3.12: `pip download --no-deps -d .whl --python-version 3.12 --platform manylinux2014_x86_64
# --only-binary=:all: diffusers==0.42.1 jsonschema referencing jsonschema-specifications rpds-py`).
# Everything that finished is packed into $OUT/gpu-runs.tar.gz, also when the time runs out.
set -uo pipefail
STOP=$((SECONDS + ${BUDGET_S:-560}))
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
pip install -q --no-deps .whl/*.whl && pip install -q --no-deps --no-build-isolation -e . || exit 1
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
MODELS="digits-pixart digits-flux digits-qwenimage"
pack() { tar czf "$OUT/gpu-runs.tar.gz.part" docs/search docs/stage2 out/stage2 2>/dev/null; mv "$OUT/gpu-runs.tar.gz.part" "$OUT/gpu-runs.tar.gz"; }

# Stage-1: the full preset at 50% and 30% (claims), and 1000-image searches at 100% (Stage-2 teachers).
timeout $((STOP - SECONDS - 200)) python tools/search_all.py --models $MODELS --budgets 0.5 0.3 --device cuda --jobs 6 \
  --out docs/search 2>&1 | tee "$OUT/search.log" &
timeout $((STOP - SECONDS - 200)) python tools/search_all.py --models digits-dit $MODELS --budgets 1.0 --images 1000 \
  --device cuda --jobs 4 --out docs/search 2>&1 | tee "$OUT/teacher.log" &
wait
pack

# Stage-2 under each 30% result, teacher = the 100% result, 3 calibration seeds, adaptive vs uniform.
for m in digits-dit $MODELS; do
  s=docs/search/$m/budget-30/schedule.json
  [ "$m" = digits-dit ] && s=docs/search/budget-30/schedule.json
  t=docs/search/$m/budget-100/schedule.json
  [ -f "$s" ] && [ -f "$t" ] || { echo "$m: no schedule or teacher, Stage-2 skipped" | tee -a "$OUT/stage2.log"; continue; }
  mkdir -p docs/stage2/$m
  timeout $((STOP - SECONDS - 15)) python tools/stage2_ablation.py --model $m --schedule $s --teacher $t --seeds 0 1 2 \
    --budgets 0.01 --num 2000 --groups 3 --device cuda --work out/stage2/$m --out docs/stage2/$m/ablation.md \
    > "$OUT/stage2-$m.log" 2>&1 &
done
wait
pack
echo "done in $SECONDS s"
