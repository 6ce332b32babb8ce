#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment in .venv with the CPU build of torch and dyod.
# --ui: also the browser UI (Gradio), Playwright and Debian's headless chromium, which the UI's tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.dyod-setup-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned: an unpinned range would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
  # the tests check dyod's Inception network against torch-fidelity's. Its package imports torchvision, which no build
  # pairs with this torch, and the module the tests use needs none: installed without dependencies, and apart from
  # site-packages, where torchmetrics would find it and fail importing torchvision
  .venv/bin/python -m pip install -q -c constraints.txt --no-deps --target .venv/vendor/torch-fidelity torch-fidelity
  rm -f .venv/.dyod-setup-*
  touch "$stamp"
fi
if [ "${1:-}" = "--ui" ]; then
  ui_stamp=.venv/.dyod-ui-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
  if [ ! -f "$ui_stamp" ]; then
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,ui-test]"
    rm -f .venv/.dyod-ui-*
    touch "$ui_stamp"
  fi
  # the browser: Debian's chromium (Playwright's own browser download cannot work offline, and is not used)
  if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null) \
        || echo "setup: could not install chromium with apt-get; the browser test will be skipped" >&2
    else
      echo "setup: no /usr/bin/chromium (install Debian's chromium as root); the browser test will be skipped" >&2
    fi
  fi
fi
