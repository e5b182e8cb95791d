#!/usr/bin/env bash
# The inference engine's GPU figures in one go (about 8 minutes on an H100),
# for a machine with an NVIDIA GPU, torch, transformers and pynvml (no daemon install):
#
#     bash bench/gpu.sh              # under $OUT (default /tmp/vcoin-gpu): gpu.txt, the log
#                                    # of it all, and each inference run's JSON
#     QUICK=1 bash bench/gpu.sh      # engine only, no HF generate or parity (about 2 min)
#     COMPILE=1 bash bench/gpu.sh    # also step 7 (about 1.5 min more)
#     DEVICE=cpu SHAPE=test bash bench/gpu.sh   # a dry run of the script itself, on a CPU
#
# 1. the card, torch and transformers versions, and the heartbeat's NVML telemetry;
# 2. bench/inference.py on the DeepSeek-R1-Distill-Qwen-1.5B shape in the daemon's
#    default configuration (fp16, CUDA graphs, 4096 positions a slot; 64 slots), HF generate
#    in the same run, a 2048-token prompt joining 8 decoding requests (chunked prefill
#    and whole), greedy parity (against HF fp16 and an fp32 yardstick), and the decode
#    step's kernel profile;
# 3. greedy parity of the engine's unfused reference path (eager steps: transformers' own
#    order of operations, bit-exact with HF generate in fp16 on a CPU) on the same prompts;
#    the SDPA backends on the engine's attention shapes (bench/attention.py);
# 4. batch 1 without the engine's triton kernels (the torch ops they replace), engine
#    only, with its kernel profile: what the kernels are worth on this card;
# 5. the batched sampler on 64 rows of DeepSeek's vocabulary (bench/sampling.py);
# 6. LoRA training steps on the same shape (bench/train.py), where peft is installed;
# 7. with COMPILE=1: batch 1 with compute.compile_decode (torch.compile under the graphs),
#    engine only (last: compiling every graph bucket is the slowest step).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/vcoin-gpu}
py=${PYTHON:-python}
mkdir -p "$out"
rm -f "$out/gpu.txt"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $py -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
    $py -c 'import triton; print("triton", triton.__version__)' || echo "triton: not installed"
    $py -c 'from vcoind.compute.telemetry import Telemetry; print(Telemetry().sample().device)'
} 2>&1 | tee -a "$out/gpu.txt"
shape=(--device "${DEVICE:-cuda}" --shape "${SHAPE:-deepseek-1.5b}")
if [ -n "${QUICK:-}" ]; then
    $py bench/inference.py "${shape[@]}" --no-hf --parity 0 --profile \
        --json "$out/engine.json" 2>&1 | tee -a "$out/gpu.txt"
else
    $py bench/inference.py "${shape[@]}" --profile --json "$out/engine.json" 2>&1 | tee -a "$out/gpu.txt"
    $py bench/inference.py "${shape[@]}" --reference --no-fp32-reference --concurrent 1 --runs 1 \
        --new-tokens 32 --join-tokens 0 --shared-prefix 0 --json "$out/reference.json" 2>&1 |
        tee -a "$out/gpu.txt"
    $py bench/attention.py --device "${DEVICE:-cuda}" --json "$out/attention.json" 2>&1 |
        tee -a "$out/gpu.txt"
    $py bench/inference.py "${shape[@]}" --no-hf --parity 0 --concurrent 1 --join-tokens 0 --kernels off \
        --profile --json "$out/nokernels.json" 2>&1 | tee -a "$out/gpu.txt"
    $py bench/sampling.py --device "${DEVICE:-cuda}" 2>&1 | tee -a "$out/gpu.txt"
    if $py -c 'import peft' 2>/dev/null; then
        $py bench/train.py "${shape[@]}" --steps 5 2>&1 | tee -a "$out/gpu.txt"
    else
        echo "bench/train.py skipped: peft is not installed here" | tee -a "$out/gpu.txt"
    fi
    if [ -n "${COMPILE:-}" ]; then
        $py bench/inference.py "${shape[@]}" --no-hf --parity 0 --concurrent 1 --join-tokens 0 \
            --compile --json "$out/compile.json" 2>&1 | tee -a "$out/gpu.txt"
    fi
fi
echo "figures in $out"
