#!/usr/bin/env bash
# The whole test suite on other releases of torch and Python than CI's (torch 2.13.0, Python 3.11), one
# fresh virtual environment each, from the repository root:
#
#   bash docs/torch_versions.sh [PYTHON:TORCH ...]        (default: the four pairs below)
#
# pyproject.toml allows any torch >= 2.9 and Python >= 3.11, so the oldest torch it admits is one of the
# pairs. PYTHON is a Python executable (`python3.12`, a pyenv path); TORCH is a release on PyPI. On x86-64
# PyPI's torch is a CUDA build of several GB that also runs on a CPU; pip's torch cap where one is
# configured (/etc/xdg/pip on this project's machines) refuses releases above it. The environments go
# under $VENVS (default /tmp/kronopt-venvs) and each suite's output into $VENVS/<name>.log; a line per
# pair at the end: its counts, or "install failed". Tests that need a feature an older torch lacks skip
# there with the reason (tests/torch_compat.py); none may fail. PYTEST_ARGS replaces the suite by a part
# of it, e.g. PYTEST_ARGS=tests/unit/test_compiled.py to check the script.
set -uo pipefail
cd "$(dirname "$0")/.."
venvs=${VENVS:-/tmp/kronopt-venvs}
mkdir -p "$venvs"
pairs=("$@")
[ ${#pairs[@]} -gt 0 ] || pairs=(python3.11:2.9.1 python3.12:2.11.0 python3.11:2.14.1 python3.13:2.15.0)
summary=()
for pair in "${pairs[@]}"; do
    python=${pair%%:*} torch_version=${pair##*:}
    name="$(basename "$python")-torch-$torch_version"
    env="$venvs/$name" log="$venvs/$name.log"
    if ! { "$python" -m venv "$env" && "$env/bin/pip" install -q "torch==$torch_version" \
            && "$env/bin/pip" install -q -e ".[test,cli]" && "$env/bin/pip" install -q -e plugins/kronopt-example-plugin; } >"$log" 2>&1; then
        summary+=("$name: install failed (see $log)")
        continue
    fi
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
    "$env/bin/python" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} >>"$log" 2>&1
    summary+=("$name: $(tail -n 1 "$log")")
done
# the editable installs above point every environment at this checkout; nothing else was changed
printf '%s\n' "${summary[@]}"
