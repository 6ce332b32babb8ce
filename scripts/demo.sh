#!/usr/bin/env bash
# Set up (if needed) and run the main job: `dyod demo` on the bundled defaults. Extra arguments go to dyod demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/dyod demo "$@"
