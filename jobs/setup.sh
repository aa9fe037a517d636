#!/usr/bin/env bash
# The whole set-up on a fresh Debian/Ubuntu machine: the system packages the test suite drives for real
# (Debian's chromium + chromium-driver for the report in a browser, postgresql for the multi-user MLflow
# store; nothing is downloaded by the tests themselves), then a virtualenv in .venv with the pinned
# CPU stack and this project in editable mode. Re-running it is cheap: what is there is kept.
#   bash jobs/setup.sh && . .venv/bin/activate
# SKIP_SYSTEM_PACKAGES=1 skips the apt step (the library and `apexdistill demo` need none of them).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SKIP_SYSTEM_PACKAGES:-0}" != "1" ]; then
  need=()
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
  ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
  if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "[setup] installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
echo "[setup] installing the Python packages into .venv (about 2 minutes the first time)"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[dev]"
# pip byte-compiles every installed package but not an editable project: compile ours too, or every process
# that imports it (each Ray worker, trial and command) compiles it again where PYTHONDONTWRITEBYTECODE is set
# (~0.5 CPU-s a process here). Python checks each .pyc against its source, so an edited module is recompiled.
python -m compileall -q platform >/dev/null
# DeepSpeed's CPU backend compiles its shared-memory collective op (deepspeed_shm_comm) the first time a
# process group starts, into ~/.cache/torch_extensions: ~30 s on 2 idle cores (~50 s under load), which the first DeepSpeed run
# (or test) would otherwise spend. Built once here; later runs find it (a cheap hash check).
echo "[setup] building DeepSpeed's CPU communication op (about 1 minute the first time)"
python - <<'PY'
import logging, warnings
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None:
    builder.load(verbose=False)
PY
echo "[setup] done: . .venv/bin/activate, then apexdistill demo"
