#!/usr/bin/env bash
# Run HERE (the machine with pip access), from anywhere in the repo, before the device call of
# run_gpu_bench.sh. The device machine has torch 2.11, numpy, Pillow, PyYAML and torchvision, no
# network, and no pydantic: this downloads pydantic and its dependencies as wheels for its Python
# (3.12, x86-64) into .whl/ (git-ignored through .git/info/exclude), pinned to the versions of
# this project's venv. The device call then carries that folder: carry [".whl"] (2.8 MB).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-.venv/bin/python}
mkdir -p .git/info .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PACKAGES=(pydantic pydantic-core annotated-types typing-inspection typing-extensions)
PINNED=$("$PY" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
EOF
)
# one version of each: an older download next to a newer one stops the install there
rm -f .whl/pydantic-*.whl .whl/pydantic_core-*.whl .whl/annotated_types-*.whl .whl/typing_inspection-*.whl \
  .whl/typing_extensions-*.whl
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $PINNED
ls -l .whl
