#!/usr/bin/env bash
# Why a layer graph fails to record on this GPU, and where the graphs' memory goes: the GPU tests of the newest
# kernels, the memory probe (1B QLoRA, graphs only) under each cudaStreamCaptureMode and allocator setting, the
# layer-graph GPU tests, the 8B LoRA memory probe; full logs under $1. A step is skipped when fewer seconds than its
# limit are left of $2 (default 500).
#     bash benchmarks/graph_capture_diagnose.sh "$OUT/diag" 500
out="${1:-/tmp/graph-diag}"
budget="${2:-500}"
mkdir -p "$out"
export TUNELAB_GRAPH_DEBUG=1
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
step() {  # name, timeout, then the command; skipped when less time is left than its timeout
  local name="$1" limit="$2"; shift 2
  if [ "$(left)" -lt "$limit" ]; then echo "== $name: skipped ($(left) s left)"; return; fi
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "== $name (rc $?, $((SECONDS - start)) s)"
  grep -E "could not record|recorder:|^step|Error|error:|passed|failed|assert|bf16:|fp32:|dropout:|^  (live|  )" \
    "$out/$name.log" | grep -v "^E  " | cut -c1-700 | head -40
}
probe=(python3 benchmarks/layer_graphs_memory.py --method qlora --steps 3 --graphs-only)
step new-kernel-tests 120 python3 -m pytest tests/gpu/test_fast_kernels_gpu.py -m gpu -p no:cacheprovider -o addopts="" \
  -q -s -k "qkv or recompute_without_output or without_grad"
step probe-thread_local 120 env TUNELAB_GRAPH_CAPTURE_MODE=thread_local "${probe[@]}"
step test-graphed-layers 150 python3 -m pytest tests/gpu/test_graphed_layers_gpu.py -m gpu -p no:cacheprovider \
  -o addopts="" -q -s -x
step llm-sft-1b 150 python3 benchmarks/llm_sft.py --out "$out/sft" --frameworks tunelab --rows 1b-lora,1b-qlora \
  --steps-1b 12 --warmup 3
cat "$out/sft/llm_sft.md" 2>/dev/null
grep -o '"layer_graphs": {[^}]*}' "$out/sft/llm_sft.json" 2>/dev/null
step probe-8b-lora 200 python3 benchmarks/layer_graphs_memory.py --method lora --shape 8b --steps 3
step probe-global 100 env TUNELAB_GRAPH_CAPTURE_MODE=global "${probe[@]}"
step probe-relaxed 90 env TUNELAB_GRAPH_CAPTURE_MODE=relaxed "${probe[@]}"
step probe-plain-allocator 90 env PYTORCH_CUDA_ALLOC_CONF= "${probe[@]}"
