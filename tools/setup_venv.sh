#!/usr/bin/env bash
# Build .venv with the pinned stack (mlflow_model/requirements.txt is the one list of pins).
#
#   tools/setup_venv.sh demo   what `make demo` needs (requirements-demo.txt): its first answer
#                              comes without the packages only the tests use
#   tools/setup_venv.sh        everything (requirements-dev.txt: the demo's set, then the Azure
#                              SDK, the test tools and Spark): `make setup`, `make test`
#
# Either way the demo's set is installed first, and the rest after it may not change it (pip is
# constrained to what the demo's step installed), so `make demo` and `make test` share one venv
# in any order. Idempotent: when the files that set a target are unchanged and mmcv's compiled
# ops import, it returns in seconds. Each step prints its time.
#
# mmcv is built from its sdist with compiled ops. Its setup.py imports torch to build the ops and
# silently skips them when torch is missing, which is exactly what pip's build isolation causes.
# So torch, numpy, setuptools (>=77 for torch, <81 because mmcv's setup.py needs pkg_resources),
# wheel and ninja go in first, then mmcv with --no-build-isolation, then a check that
# `import mmcv._ext` works (pip caches whatever wheel it built, ops or not).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-all}
case "$TARGET" in demo|all) ;; *) echo "usage: $0 [demo|all]" >&2; exit 2 ;; esac
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
PINS=mlflow_model/requirements.txt
DEMO_STAMP="$VENV/.setup-stamp-demo"
STAMP="$VENV/.setup-stamp"
demo_want=$(cat "$PINS" requirements-demo.txt pyproject.toml tools/setup_venv.sh | sha256sum | cut -d' ' -f1)
want=$(cat "$PINS" requirements-demo.txt requirements-dev.txt requirements-nodeps.txt pyproject.toml \
       tools/setup_venv.sh | sha256sum | cut -d' ' -f1)

has_ops() { "$VENV/bin/python" -c "import mmcv._ext" 2>/dev/null; }
stamped() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ] && has_ops; }
step_started=$SECONDS
step_done() { echo "setup: $1 in $((SECONDS - step_started)) s"; step_started=$SECONDS; }

if { [ "$TARGET" = demo ] && stamped "$DEMO_STAMP" "$demo_want"; } || stamped "$STAMP" "$want"; then
  echo "setup: $VENV is up to date"
  exit 0
fi
# Every install is constrained by the pins, so no dependency drags in another numpy, or
# opencv-python beside opencv-python-headless (mmcv asks for the GUI build unless one is present).
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)

pin() { grep -E "^$1==" "$PINS" | head -1; }
# The GUI opencv (which mmcv and mmengine ask for) and the headless one share the cv2 folder: if
# an install brought the GUI one in, keep only the headless one, reinstalled whole.
keep_only_headless_opencv() {
  if "${pip[@]}" show -q opencv-python >/dev/null 2>&1; then
    "${pip[@]}" uninstall -q -y opencv-python
    "${pip[@]}" install -q --force-reinstall --no-deps "$(pin opencv-python-headless)"
  fi
}
if ! stamped "$DEMO_STAMP" "$demo_want"; then  # the demo's set
  [ -x "$VENV/bin/python" ] || { echo "setup: creating $VENV with $PY"; "$PY" -m venv "$VENV"; }
  "${pip[@]}" install -q "pip==25.2"
  step_done "the venv and pip"
  echo "setup: installing torch and mmcv's build requirements"
  "${pip[@]}" install -q -c "$PINS" torch numpy opencv-python-headless pillow "setuptools>=77,<81" wheel ninja
  step_done "torch and mmcv's build requirements"

  # Compiling mmcv's 77 op sources takes minutes (about 7 on 2 idle cores), and pip shows it only as
  # "still running...". So pip runs verbosely into a log, and a reporter prints every
  # PROGRESS_SECONDS how many sources torch's extension builder (ninja, which prints "[N/M] c++ ..."
  # as each compile finishes) has compiled. pip stays in the foreground so that Ctrl-C stops it.
  report_build_progress() {
    local log=$1 started=$SECONDS done_of_total
    while sleep "${PROGRESS_SECONDS:-30}"; do
      done_of_total=$(grep -o '^ *\[[0-9]*/[0-9]*\]' "$log" | tail -1 | tr -d '[] ' || true)  # pip indents
      if [ -n "$done_of_total" ]; then
        echo "setup: mmcv build: ${done_of_total%/*} of ${done_of_total#*/} sources compiled, $((SECONDS - started)) s"
      else  # before the compile, or setuptools' own compiler, which prints each command
        echo "setup: mmcv build: $(grep -c -- '\.cpp -o ' "$log" || true) sources compiled, $((SECONDS - started)) s"
      fi
    done
  }
  # The ops compile with Python's own flags (-O3 -DNDEBUG ...) but without debug info (-g0): the
  # same machine code in a 1.4 MB wheel instead of 32 MB, and 64 % less compile time (804 s of CPU
  # instead of about 2250: each source spends most of its time on torch's headers, and -g makes
  # that about 3x dearer; measured, see docs/setup.md).
  # CFLAGS replaces Python's flags in setuptools rather than adding to them, so they are repeated.
  build_mmcv() {  # extra pip arguments
    local log="$VENV/mmcv-build.log" started=$SECONDS reporter status=0 cflags
    cflags=${CFLAGS:-"$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("CFLAGS") or "")') -g0"}
    report_build_progress "$log" &
    reporter=$!
    # The venv's bin first on PATH: torch looks for `ninja` there by name, and without it falls
    # back to setuptools compiling one source after another, whatever MAX_JOBS says.
    PATH="$(cd "$VENV" && pwd)/bin:$PATH" CFLAGS=$cflags MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      "${pip[@]}" install -v --no-build-isolation -c "$PINS" "$@" "$(pin mmcv)" >"$log" 2>&1 || status=$?
    kill "$reporter" 2>/dev/null || true
    wait "$reporter" 2>/dev/null || true
    if [ "$status" != 0 ]; then
      echo "setup: pip could not build mmcv; the end of $log:" >&2
      tail -n 30 "$log" >&2
      exit "$status"
    fi
    echo "setup: mmcv installed in $((SECONDS - started)) s (log: $log)"
  }

  if ! has_ops; then
    echo "setup: building $(pin mmcv) with compiled ops (about 7 minutes on 2 idle cores the first time; pip caches the wheel)"
    build_mmcv
    if ! has_ops; then
      echo "setup: the installed mmcv has no compiled ops (a cached wheel built without them?); rebuilding"
      "${pip[@]}" uninstall -y mmcv
      "${pip[@]}" cache remove mmcv || true
      build_mmcv --no-cache-dir
    fi
    has_ops || { echo "setup: mmcv's compiled ops still do not import; giving up" >&2; exit 1; }
  fi

  step_done "mmcv with its compiled ops"

  echo "setup: installing the demo's packages (requirements-demo.txt) and this project (editable)"
  "${pip[@]}" install -q -c "$PINS" -r requirements-demo.txt
  keep_only_headless_opencv
  "${pip[@]}" install -q --no-build-isolation --no-deps -e .
  has_ops
  # What the demo's step installed, as constraints for the rest: a test tool that wanted another
  # version of any of it fails the setup, naming the conflict, instead of moving it.
  "${pip[@]}" freeze --exclude-editable > "$VENV/demo-packages.txt"
  echo "$demo_want" > "$DEMO_STAMP"
  step_done "the demo's packages"
fi

if [ "$TARGET" = all ]; then
  echo "setup: installing the Azure ML SDK, the test tools and Spark (requirements-dev.txt)"
  "${pip[@]}" install -q -c "$PINS" -c "$VENV/demo-packages.txt" -r requirements-dev.txt
  "${pip[@]}" install -q --no-deps -r requirements-nodeps.txt
  keep_only_headless_opencv
  has_ops
  echo "$want" > "$STAMP"
  step_done "the Azure ML SDK, the test tools and Spark"
fi
echo "setup: done in ${SECONDS}s ($("$VENV/bin/python" -c 'import torch, mmcv, mmdet, mmengine, mlflow; print(f"torch {torch.__version__}, mmcv {mmcv.__version__} with ops, mmdet {mmdet.__version__}, mmengine {mmengine.__version__}, mlflow {mlflow.__version__}")'))"
