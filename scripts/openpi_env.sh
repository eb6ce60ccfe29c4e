#!/usr/bin/env bash
# Builds a CPU environment of upstream openpi with this plugin installed, for the openpi-gated tests
# (tests/test_openpi_*.py). Used by .ci/run and by developers:
#   bash scripts/openpi_env.sh VENV [SOURCE]
#     VENV    the virtual environment to create, outside this repository (e.g. /tmp/openpi-venv)
#     SOURCE  the folder with openpi's tarball and its locked CPU requirements (default:
#             ../shared/openpi-15a9616/source beside this repository)
# then:  JAX_PLATFORMS=cpu VENV/bin/python -m pytest tests/test_openpi_*.py
# openpi is unpacked into VENV/src/openpi (outside the repository; nothing of upstream is ever copied into it) and
# installed editable from there, so the tests find its scripts/train.py; the `lerobot` stand-in comes from
# tests/openpi_support/lerobot_standin; openpi's transformers_replace is copied over the installed transformers, as
# openpi's README says. The plugin is installed last, constrained to openpi's locked versions, so it changes none.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:?usage: openpi_env.sh VENV [SOURCE]}
source_dir=$(cd "${2:-$repo/../shared/openpi-15a9616/source}" && pwd)
python=${OPENPI_ENV_PYTHON:-python3}
mkdir -p "$venv"
venv=$(cd "$venv" && pwd)
case "$venv/" in
"$repo"/*) echo "openpi_env: $venv is inside the repository; put it outside" >&2 && exit 2 ;;
esac

"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
    echo "openpi_env: openpi's lock is for Python 3.11; $("$python" --version) may not resolve it" >&2
"$python" -m venv "$venv"
rm -rf "$venv/src/openpi"
mkdir -p "$venv/src"
tar -xzf "$source_dir"/openpi-*.tar.gz -C "$venv/src"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" -r "$source_dir/requirements-cpu.txt"
"${pip[@]}" --no-deps -e "$venv/src/openpi" -e "$venv/src/openpi/packages/openpi-client"
# built from a copy, so that no build debris lands in the repository
rm -rf "$venv/src/lerobot_standin"
cp -r "$repo/tests/openpi_support/lerobot_standin" "$venv/src/lerobot_standin"
"${pip[@]}" --no-deps "$venv/src/lerobot_standin"
transformers_dir=$("$venv/bin/python" -c 'import os, transformers; print(os.path.dirname(transformers.__file__))')
cp -r "$venv/src/openpi/src/openpi/models_pytorch/transformers_replace/." "$transformers_dir/"
"${pip[@]}" -c "$source_dir/requirements-cpu.txt" -e "$repo[test]"
