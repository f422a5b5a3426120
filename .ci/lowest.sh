#!/usr/bin/env bash
# `make test-lowest`: are pyproject.toml's dependency floors true? Installs every direct
# dependency (the package's and the test extra's) at exactly its floor into .venv-lowest, the
# indirect ones as pip resolves them, and runs the unit tests there. A floor that only looks
# right (the code needs a newer release) fails here instead of on a user's machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-lowest

"$PYTHON" -m venv --clear "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# Each requirement must read `name>=floor` (a requirement without a floor claims nothing that
# could be checked, so it is an error here); the constraints pin each name to its floor.
"$VENV/bin/python" - pyproject.toml >"$VENV/floors.txt" <<'PY'
import re
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
requirements = project["dependencies"] + project["optional-dependencies"]["test"]
for requirement in requirements:
    floor = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", requirement)
    if floor is None:
        sys.exit(f"lowest.sh: {requirement!r} has no `>=floor` to test")
    print(f"{floor[1]}=={floor[2]}")
PY
echo "lowest.sh: direct dependencies at their floors:" $(cat "$VENV/floors.txt")
"$VENV/bin/pip" install --quiet --constraint "$VENV/floors.txt" -e '.[test]'
"$VENV/bin/pip" check
# The floors of the test extra's checkers too. mypy at its floor is not run over the package:
# the types it sees come from the stub packages' floors too, and `make test` checks the
# package with the versions a fresh install resolves.
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/lint-imports" --no-cache
# The unit tests by default; arguments choose others.
if [ $# -eq 0 ]; then
  set -- tests/unit
fi
"$VENV/bin/pytest" -p no:cacheprovider "$@"
