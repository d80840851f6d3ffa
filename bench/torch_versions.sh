#!/usr/bin/env bash
# Run the test suite against other torch releases than the one this machine pins.
#
# batchfit leans on PyTorch internals (fake tensors, dispatch and function modes, autograd nodes,
# the allocator's rules), so every release users may install is a new platform. This script makes
# one venv per release under $VENVS (default /tmp/batchfit-torch), installs that torch with the
# project's test extras, and runs pytest there on this checkout's source (PYTHONPATH=src). It
# downloads torch (a CUDA build from PyPI, several GB for new releases), so it stays out of the
# default test command; run it before each release. The results of the last run are in
# docs/architecture.md ("The torch versions").
#
#   bench/torch_versions.sh                      # the oldest release pyproject claims (2.11), and the newest (2.15)
#   bench/torch_versions.sh 2.15.0:0.29.2 -- -x tests/test_estimate_cpu.py
#   bench/torch_versions.sh /work/venv-t211 /work/venv-t215   # venvs you built: used as they are
#
# Arguments: TORCH:TORCHVISION pairs or existing venv directories (nothing is installed into
# those), then optionally `--` and pytest's arguments. Each run's log: $VENVS/torch-VERSION.log.
# PIP_CONFIG_FILE=/dev/null lifts this workplace's pip cap (torch<=2.14.1) for these venvs only.
set -uo pipefail
cd "$(dirname "$0")/.."
VENVS=${VENVS:-/tmp/batchfit-torch}
mkdir -p "$VENVS" || exit 2
targets=()
while [[ $# -gt 0 && $1 != "--" ]]; do targets+=("$1"); shift; done
[[ ${1:-} == "--" ]] && shift
pytest_args=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=("2.11.0:0.26.0" "2.15.0:0.29.2")
[[ ${#pytest_args[@]} -eq 0 ]] && pytest_args=(-q -p no:cacheprovider)

status=0
summary=()
for target in "${targets[@]}"; do
    if [[ -d $target ]]; then
        venv=$target
        if ! torch_v=$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])'); then
            summary+=("$venv: no torch there")
            status=1
            continue
        fi
        echo "=== torch $torch_v ($venv, as it is)"
    else
        torch_v=${target%%:*}
        vision_v=${target#*:}
        venv="$VENVS/torch-$torch_v"
        echo "=== torch $torch_v, torchvision $vision_v ($venv)"
        if [[ ! -x $venv/bin/python ]]; then
            python3 -m venv "$venv" || exit 2
        fi
        if ! PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" install -q "torch==$torch_v" "torchvision==$vision_v" -e '.[test]'; then
            summary+=("torch $torch_v: install failed")
            status=1
            continue
        fi
    fi
    log="$VENVS/torch-$torch_v.log"
    start=$(date +%s)
    PYTHONPATH=src "$venv/bin/python" -m pytest "${pytest_args[@]}" 2>&1 | tee "$log" | tail -n 25
    rc=${PIPESTATUS[0]}
    counts=$(grep -Eo '[0-9]+ (passed|failed|error)[^=]*' "$log" | tail -n 1)
    summary+=("torch $torch_v: pytest exit $rc ($counts; $(($(date +%s) - start)) s wall, $(date -u +%F), $(nproc) cores)")
    [[ $rc -ne 0 ]] && status=1
done
printf '%s\n' "${summary[@]}"
exit $status
