#!/usr/bin/env bash
# The prepared GPU check (one lent GPU, at most 5 minutes: the timeouts add up to 300 s):
# compiled kernel tests on the GPU, the attention benchmark table, the data-parallel overlap and
# the checkpoint stall (tools/bench_parallel.py --groups DP,CKPT), and a short bf16 training run
# of a ~1B-parameter causal decoder on this one GPU with its MFU. Runs from the repository root
# on a machine with torch + triton (no install needed: PYTHONPATH is the checkout; nothing here
# imports megatron-core). Writes logs and tables under $OUT (default benchmarks/gpu/).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PYTHON:-python3}
status=0

echo "== device"
nvidia-smi -L || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name())" | tee "$OUT/versions.txt"

echo "== GPU tests: compiled kernels, evaluation on CUDA, dropout streams"
timeout 100 $PY -m pytest tests/kernels tests/eval/test_eval_gpu.py tests/parallel/test_dropout_tp.py \
  -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/kernel_tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== attention benchmark (bf16, causal + prefix, fwd and fwd+bwd, vs SDPA and FlexAttention)"
# 16k tokens per batch, width 2048; rows reach the CSV case by case (a timeout keeps them).
timeout 80 $PY -m kernels.bench --seq-lens 1024 4096 8192 --head-dims 64 128 \
  --csv "$OUT/attention.csv" 2>&1 | tee "$OUT/bench_attention.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== DP overlap and checkpoint stall: DP2 with no / post-backward / overlapped reduction,"
echo "   synchronous vs asynchronous save (0.1B model + AdamW, bf16 autocast, on CUDA)"
# Two ranks on one GPU talk over gloo (NCCL takes one GPU a rank: it is used with two or more).
timeout 45 $PY tools/bench_parallel.py --device cuda --groups DP,CKPT --trials 2 --steps 3 \
  --warmup 1 --micro 4 --micro-batch 4 --seq-len 512 --model.d_model 1024 --model.d_ff 4096 \
  --model.n_layers 8 --model.n_heads 16 --model.head_dim 64 2>&1 | tee "$OUT/bench_parallel.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

# ~1.0B parameters: 20 layers of d_model 2048, 32 heads x 64, GEGLU d_ff 5120 (48M each) and the
# corpus's 8,064-id vocabulary; 8 x 1024 tokens a step, bf16 autocast, Adafactor (the study's
# optimizer; its factored state keeps the final checkpoint at ~4 GB): well inside an 80 GiB
# A100 by tools/estimate_memory.py; tests/parallel/test_estimate_memory.py validates these
# settings. The run (and its checkpoint) goes to /tmp; its metrics are copied under $OUT.
ONE_B=(--model.d_model 2048 --model.n_heads 32 --model.head_dim 64 --model.d_ff 5120
       --model.n_layers 20 --data.seq_len 1024 --run.micro_batch 8 --run.global_batch 8
       --run.precision bf16 --run.deterministic false --optim.name adafactor)
RUN_1B=${TMPDIR:-/tmp}/megarch_gpu_check_1b
rm -rf "$RUN_1B"
echo "== MFU of a ~1B-parameter causal decoder on one GPU (bf16, 25 steps; MFU on each line)"
timeout 75 $PY -m megarch.train --preset cd_flm_tiny --run.resume none \
  --run.out_dir "$RUN_1B" --run.device cuda --run.steps 25 --run.log_every 5 \
  --run.eval_every 0 --run.eval_batches 0 --run.save_every 0 "${ONE_B[@]}" 2>&1 \
  | tee "$OUT/train_1b.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
cp "$RUN_1B/metrics.jsonl" "$OUT/train_1b_metrics.jsonl" 2>/dev/null || true
exit $status
