#!/usr/bin/env bash
# One device call for issue 7: the newest GPU tests, the peers table (tunelab, Unsloth, HF + peft, Liger on the four
# rows), the host-embedding gather micro-benchmark, `tunelab plan` against measured peaks and the 8B load-memory
# probe. Logs under $1/logs, the table under $1/peers (8 files at most, within what a device call returns). A step
# is skipped when fewer seconds than its limit are left of $2 (default 570): the peers take ~390 s on an H100, so
# the steps after them need a second call, with SKIP_PEERS=1.
#     bash benchmarks/issue7_call.sh "$OUT" 570
#     SKIP_PEERS=1 bash benchmarks/issue7_call.sh "$OUT" 570
out="${1:-/tmp/issue7}"
budget="${2:-570}"
mkdir -p "$out/logs"
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
step() {  # name, timeout, then the command; skipped when less time is left than its timeout
  local name="$1" limit="$2"; shift 2
  if [ "$(left)" -lt "$limit" ]; then echo "== $name: skipped ($(left) s left)"; return; fi
  timeout "$limit" "$@" >"$out/logs/$name.log" 2>&1
  echo "== $name (rc $?, $((SECONDS - start)) s)"
  grep -E "passed|failed|Error|error:|assert|^\| |^NVIDIA|^step|GiB|ms" "$out/logs/$name.log" | grep -v "^E  " \
    | cut -c1-400 | tail -40
}
gpu_test=(python3 -m pytest -m gpu -p no:cacheprovider -o addopts="" -q -x)
step host-embedding-tests 90 "${gpu_test[@]}" tests/gpu/test_host_embedding_gpu.py
# the four frameworks' rows take ~390 s on an H100 (2026-12-08); a budget under that stops the last peers
[ -n "${SKIP_PEERS:-}" ] || step peers $(( ${PEERS_BUDGET:-450} + 60 )) python3 benchmarks/llm_sft.py --out "$out/peers" \
  --frameworks "${FRAMEWORKS:-tunelab,unsloth,hf,liger}" --budget-s "${PEERS_BUDGET:-450}" --steps-1b 12 --steps-8b 7 \
  --warmup 3
step kept-test 80 "${gpu_test[@]}" -s tests/gpu/test_graphed_layers_gpu.py -k kept
step gather-micro 50 python3 benchmarks/host_embedding_micro.py
step plan-accuracy 110 python3 benchmarks/plan_accuracy.py --only "${PLAN_ROWS:-1b-lora-1024,1b-qlora-2048,1b-lora-2048-nockpt}" \
  --out "$out/logs"
step load-probe 120 python3 benchmarks/load_memory_probe.py --rows 8b-qlora,8b-lora --steps 2
