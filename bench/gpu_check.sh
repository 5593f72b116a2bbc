#!/usr/bin/env bash
# The GPU path's checks, one line each, then a summary (at most ~8 minutes on one H200).
#
#   bench/gpu_check.sh /path/to/wheels        # or: LOLRL_WHEELS=/path/to/wheels bench/gpu_check.sh
#   bench/gpu_check.sh --cpu                  # CPU mode (tiny models; GPU-only checks skipped), for CI
#
# The GPU machine has torch, transformers, peft and accelerate, and no internet: the wheels the
# other checks need (trl, datasets, bitsandbytes, deepspeed, flash_attn or kernels, liger_kernel, and their
# dependencies) come in a folder the caller names. Each is installed from that folder only
# (pip --no-index); a missing one makes the checks that need it print SKIP with the reason.
# Output: lines "CHECK <name> PASS|FAIL|SKIP <details>", then "SUMMARY ..."; exit 1 if a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=()
WHEELS="${LOLRL_WHEELS:-}"
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=(--cpu) ;;
    --only=*) MODE+=(--only "${arg#--only=}") ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) WHEELS="$arg" ;;
  esac
done

PY="${PYTHON:-python}"
if [ -n "$WHEELS" ]; then
  if [ ! -d "$WHEELS" ]; then echo "error: wheel folder '$WHEELS' does not exist" >&2; exit 2; fi
  for pkg in datasets trl bitsandbytes deepspeed flash_attn kernels liger_kernel; do
    if ls "$WHEELS" | grep -qi "^${pkg//_/[-_]}-"; then
      if "$PY" -m pip install --no-index --find-links "$WHEELS" --quiet "$pkg" >/dev/null 2>&1; then
        echo "wheel $pkg: installed"
      else
        echo "wheel $pkg: present but did not install (a dependency missing from $WHEELS?)"
      fi
    else
      echo "wheel $pkg: not in $WHEELS"
    fi
  done
else
  echo "no wheel folder given (argument or LOLRL_WHEELS): checks needing extra wheels will be skipped"
fi

export HF_HUB_OFFLINE=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${LOLRL_GPU_CHECK_TIMEOUT:-480}" "$PY" bench/gpu_check.py ${MODE[@]+"${MODE[@]}"}
