#!/usr/bin/env bash
# Why a layer graph fails to record on this GPU: the memory probe (1B QLoRA, graphs only) under each
# cudaStreamCaptureMode and allocator setting, then the layer-graph GPU tests; full logs under $1 (default /tmp).
#     bash benchmarks/graph_capture_diagnose.sh "$OUT/diag"
out="${1:-/tmp/graph-diag}"
mkdir -p "$out"
export TUNELAB_GRAPH_DEBUG=1
probe() {  # name, then env assignments
  local name="$1"; shift
  env "$@" timeout 150 python3 benchmarks/layer_graphs_memory.py --method qlora --steps 3 --graphs-only \
    >"$out/probe-$name.log" 2>&1
  echo "== probe $name (rc $?)"
  grep -E "could not record|recorder:|^step|Error|error:" "$out/probe-$name.log" | cut -c1-600 | head -12
}
probe thread_local-expandable TUNELAB_GRAPH_CAPTURE_MODE=thread_local
probe global-expandable TUNELAB_GRAPH_CAPTURE_MODE=global
probe relaxed-expandable TUNELAB_GRAPH_CAPTURE_MODE=relaxed
probe thread_local-plain TUNELAB_GRAPH_CAPTURE_MODE=thread_local PYTORCH_CUDA_ALLOC_CONF=
timeout 240 python3 -m pytest tests/gpu/test_graphed_layers_gpu.py -m gpu -p no:cacheprovider -o addopts="" -q -s \
  >"$out/test-graphed-layers.log" 2>&1
echo "== test_graphed_layers_gpu (rc $?)"
grep -E "could not record|passed|failed|Error|assert|bf16:|fp32:|dropout:" "$out/test-graphed-layers.log" | cut -c1-600 | head -30
timeout 150 python3 benchmarks/llm_sft.py --out "$out/sft" --frameworks tunelab --rows 1b-qlora --steps-1b 8 --warmup 3 \
  >"$out/llm-sft.log" 2>&1
echo "== llm_sft 1b-qlora (rc $?)"
grep -E "could not record|Error" "$out/llm-sft.log" | cut -c1-600 | head -5
cat "$out/sft/llm_sft.md" 2>/dev/null | head -8; grep -o '"layer_graphs": {[^}]*}' "$out/sft/llm_sft.json" 2>/dev/null
