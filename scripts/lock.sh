#!/usr/bin/env bash
# `make lock`: rewrite constraints.txt, the versions of everything the test suite runs against.
#
# A new venv resolves the test, eval and dev extras from scratch within pyproject.toml's bounds, and
# pip freeze records its choice. torch (and what only a CUDA build brings) stays out: `make` installs
# the local CPU wheel torch==2.13.0 where none is present and keeps a GPU machine's own build.
# Run it on the CI's Python (3.11), then run `make test` in a fresh venv (scripts/fresh_check.sh)
# before committing the new file.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q torch==2.13.0
"${pip[@]}" install -q ".[test,eval,dev]"
{
    echo "# The test environment's versions, for pip's -c (make install-test); rebuilt by \`make lock\`."
    echo "# Resolved on Python $("$work/venv/bin/python" -c 'import platform; print(platform.python_version())'), $(date -u +%Y-%m-%d); torch is installed apart (Makefile)."
    "${pip[@]}" freeze --all | grep -v -i -E '^(dsv2|torch|triton|nvidia-[a-z0-9-]+|pip|setuptools|wheel)([=@ ]|$)'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) pins)"
