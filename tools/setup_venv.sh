#!/usr/bin/env bash
# Build .venv with the pinned stack (mlflow_model/requirements.txt is the one list of pins).
# Idempotent: when the pin files and pyproject.toml are unchanged and mmcv's compiled ops import,
# it returns in seconds.
#
# mmcv is built from its sdist with compiled ops. Its setup.py imports torch to build the ops and
# silently skips them when torch is missing, which is exactly what pip's build isolation causes.
# So torch, numpy, setuptools (>=77 for torch, <81 because mmcv's setup.py needs pkg_resources),
# wheel and ninja go in first, then mmcv with --no-build-isolation, then a check that
# `import mmcv._ext` works (pip caches whatever wheel it built, ops or not).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
PINS=mlflow_model/requirements.txt
STAMP="$VENV/.setup-stamp"
want=$(cat "$PINS" requirements-dev.txt pyproject.toml tools/setup_venv.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import mmcv._ext" 2>/dev/null; then
  echo "setup: $VENV is up to date"
  exit 0
fi

pin() { grep -E "^$1==" "$PINS" | head -1; }
[ -x "$VENV/bin/python" ] || { echo "setup: creating $VENV with $PY"; "$PY" -m venv "$VENV"; }
# Every install is constrained by the pins, so no dependency drags in another numpy, or
# opencv-python beside opencv-python-headless (mmcv asks for the GUI build unless one is present).
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q "pip==25.2"
echo "setup: installing torch and mmcv's build requirements"
"${pip[@]}" install -q -c "$PINS" torch numpy opencv-python-headless pillow "setuptools>=77,<81" wheel ninja

has_ops() { "$VENV/bin/python" -c "import mmcv._ext" 2>/dev/null; }
if ! has_ops; then
  echo "setup: building $(pin mmcv) with compiled ops (about 9 minutes on 2 cores the first time; pip caches the wheel)"
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "${pip[@]}" install --no-build-isolation -c "$PINS" "$(pin mmcv)"
  if ! has_ops; then
    echo "setup: the installed mmcv has no compiled ops (a cached wheel built without them?); rebuilding"
    "${pip[@]}" uninstall -y mmcv
    "${pip[@]}" cache remove mmcv || true
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "${pip[@]}" install --no-build-isolation --no-cache-dir -c "$PINS" "$(pin mmcv)"
  fi
  has_ops || { echo "setup: mmcv's compiled ops still do not import; giving up" >&2; exit 1; }
fi

echo "setup: installing the rest of the stack and this project (editable)"
"${pip[@]}" install -q -c "$PINS" -r requirements-dev.txt
# The GUI opencv (which mmcv asks for unless a cv2 is present) and the headless one share the
# cv2 folder: if both got in, keep only the headless one, reinstalled whole.
if "${pip[@]}" show -q opencv-python >/dev/null 2>&1; then
  "${pip[@]}" uninstall -q -y opencv-python
  "${pip[@]}" install -q --force-reinstall --no-deps "$(pin opencv-python-headless)"
fi
"${pip[@]}" install -q --no-build-isolation --no-deps -e .
has_ops
echo "$want" > "$STAMP"
echo "setup: done in ${SECONDS}s ($("$VENV/bin/python" -c 'import torch, mmcv, mmdet, mmengine, mlflow; print(f"torch {torch.__version__}, mmcv {mmcv.__version__} with ops, mmdet {mmdet.__version__}, mmengine {mmengine.__version__}, mlflow {mlflow.__version__}")'))"
