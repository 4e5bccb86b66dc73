#!/usr/bin/env bash
# What a new user gets: a new clone of this repository's HEAD and a new venv, then the README's two
# commands (`make run`, `make test`), timed, with the test counts and every skip's reason.
# Uncommitted changes are not in the clone: commit first. Usage: scripts/fresh_check.sh [--keep]
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d /tmp/dsv2-fresh.XXXXXX)
[ "${1:-}" = "--keep" ] || trap 'rm -rf "$work"' EXIT
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
    echo "note: uncommitted changes in $repo are not part of this check"
fi

git clone -q "$repo" "$work/dsv2" || exit 1
cd "$work/dsv2"
echo "clone of $(git log -1 --format='%h %s' | cut -c1-90)"
echo "in $work; $("$python" --version)"
"$python" -m venv "$work/venv" && "$work/venv/bin/python" -m pip install -q --upgrade pip >"$work/pip.log" 2>&1 \
    || { cat "$work/pip.log"; exit 1; }
py="$work/venv/bin/python"

status=0
SECONDS=0
make run PYTHON="$py" >"$work/run.log" 2>&1 || status=1
echo "make run:  $([ $status = 0 ] && echo ok || echo FAILED) in ${SECONDS} s (log: $work/run.log)"
[ $status = 0 ] || tail -20 "$work/run.log"
"$py" -c "import torch; print('torch', torch.__version__, 'CPU kernels', torch.backends.cpu.get_cpu_capability())"

SECONDS=0
PYTEST_ADDOPTS="-rs --junitxml=$work/junit.xml" make test PYTHON="$py" >"$work/test.log" 2>&1
test_status=$?
echo "make test: $([ $test_status = 0 ] && echo ok || echo FAILED) in ${SECONDS} s (log: $work/test.log)"
"$py" - "$work/junit.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET
from collections import Counter

try:
    cases = list(ET.parse(sys.argv[1]).iter("testcase"))
except (OSError, ET.ParseError):
    sys.exit("no test report: the run stopped before pytest finished")
outcome, reasons, failed = Counter(), Counter(), []
for case in cases:
    kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
    kind = kinds[0] if kinds else "passed"
    outcome[kind] += 1
    if kind == "skipped":
        reasons[case.find("skipped").get("message", "")] += 1
    elif kind != "passed":
        failed.append(f"{case.get('classname')}::{case.get('name')}")
print("tests:", ", ".join(f"{n} {k}" for k, n in sorted(outcome.items())))
for reason, n in reasons.most_common():
    print(f"  skipped {n:3d}: {reason}")
for name in failed:
    print(f"  FAILED: {name}")
PY
[ $test_status = 0 ] || { grep -E "^(FAILED|ERROR)" "$work/test.log" | head -20; status=1; }
exit $status
