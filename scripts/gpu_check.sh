#!/usr/bin/env bash
# The prepared GPU check (README, "A GPU machine without Rust"). Run it from the repository root
# on a machine with an NVIDIA GPU and PyTorch but no Rust, after `cargo xtask gpu-bundle
# --torch-version <that machine's torch version>` on a build machine has written gpu/ (mtkd and
# the NCCL tests, built against that libtorch) and gpu/ has been copied along with the tree.
#
# What it runs, each under a time limit, writing logs and results under $OUT (default gpu-out/):
#   1. mtkd doctor: libtorch's version, CUDA and cuDNN as mtkd sees them;
#   2. the NCCL backend's tests (a world of one over a real ProcessGroupNCCL);
#   3. the default run on CUDA, on the committed Fashion-MNIST subset (the full set is not carried);
#   4. mtkd's training step against eager PyTorch on the same GPU (mtkd bench-steps and
#      scripts/bench_eager.py --device cuda, the published agent's config as in cargo xtask bench),
#      and the report $OUT/PERF-gpu.md.
# A step that fails is logged and the next one runs; the script ends non-zero if any failed.
set -uo pipefail
OUT=${OUT:-gpu-out}
LIMIT=${LIMIT:-240}
PY=${PYTHON:-python3}
# DEVICE=cpu and TORCH_LIB=<a libtorch of gpu/'s version> rehearse the script on a build machine.
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT/raw"
failed=0
log() { echo "== $*" | tee -a "$OUT/check.log"; }
step() {
    local name=$1
    shift
    log "$name: $*"
    local t0=$SECONDS
    timeout "$LIMIT" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    log "$name: exit $rc after $((SECONDS - t0)) s"
    tail -n 8 "$OUT/$name.log" | tee -a "$OUT/check.log"
    [ "$rc" -eq 0 ] || failed=1
}

[ -x gpu/mtkd ] || { echo "gpu/mtkd is missing: run cargo xtask gpu-bundle on a build machine first" >&2; exit 2; }
TORCH_LIB=${TORCH_LIB:-$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')} || exit 2
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MTKD_DATA_DIR="$PWD/data"
cat gpu/BUILT.txt | tee -a "$OUT/check.log"
"$PY" -c 'import torch; print("PyTorch", torch.__version__, "CUDA", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")' | tee -a "$OUT/check.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/check.log"

DATA=(--set data.root=fashion-mnist-mini --set data.train_subset=0 --set "run.teacher_cache=$OUT/teachers")
step doctor gpu/mtkd doctor
step nccl-tests gpu/nccl-tests --ignored --test-threads=1
step default-cuda gpu/mtkd train --config configs/default.toml --set run.device=$DEVICE "${DATA[@]}" --out "$OUT/default-cuda"
# The published agent (parity mode), which the eager reference implements.
sed 's/^mode = "meta"$/mode = "parity"/' configs/default.toml >"$OUT/default-parity.toml"
step bench-mtkd gpu/mtkd bench-steps --config "$OUT/default-parity.toml" --set run.device=$DEVICE "${DATA[@]}" \
    --warmup 5 --steps 30 --json "$OUT/raw/fmnist-default-$DEVICE-mtkd-r0.json"
step bench-eager "$PY" scripts/bench_eager.py --plan "$OUT/raw/fmnist-default-$DEVICE-mtkd-r0.json" --device "$DEVICE" \
    --warmup 5 --steps 30 --json "$OUT/raw/fmnist-default-$DEVICE-eager-r0.json"
step bench-report gpu/mtkd bench-report --raw "$OUT/raw" --command "scripts/gpu_check.sh" --out "$OUT/PERF-gpu.md"
log "done (failed: $failed)"
exit "$failed"
