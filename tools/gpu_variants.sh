#!/usr/bin/env bash
# Follow-up GPU measurements (docs/speed.md): after tools/gpu_check.sh found the compiled step leaving the GPU idle,
# the variants of ours that remove host overhead: cuDNN autotuning, fewer host-device syncs, CUDA graphs
# (torch.compile mode reduce-overhead), for training and scoring, on-device and through the RecordIO loader.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python || command -v python3)
B=("$PY" tools/bench_train.py --network iresnet50 --num_classes 10572 --steps 40 --warmup 8 --dtype bf16 --device cuda)
W=$(( $(nproc) > 16 ? 14 : $(nproc) - 2 ))
DATA=$(mktemp -d)/synthetic
run() { echo "== $*"; timeout 150 "$@" 2>&1 | grep -v "^USDT" || echo "(exit $?)"; }
run "${B[@]}" --batch_size 256 --loops plain,ours
run "${B[@]}" --batch_size 256 --loops ours --compile
run "${B[@]}" --batch_size 256 --loops ours --compile --compile_mode reduce-overhead --profile
"$PY" make_synthetic_dataset.py --out "$DATA" --num_ids 300 --image_size 112 --val_pairs 200 --ijb_templates 0 --quiet
run "${B[@]}" --batch_size 256 --loops ours --compile --compile_mode reduce-overhead --loader recordio --rec "$DATA" --workers "$W"
run "${B[@]}" --batch_size 256 --loops plain,ours --loader recordio --rec "$DATA" --workers "$W"
run "${B[@]}" --batch_size 512 --loops score
run "${B[@]}" --batch_size 512 --loops score --compile --compile_mode reduce-overhead
run "${B[@]}" --batch_size 512 --loops score --compile
