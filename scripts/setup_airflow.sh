#!/usr/bin/env bash
# Create the Airflow environment: a venv of its own (never the main .venv), holding
# apache-airflow and the Spark provider, plus pytest for tests/airflow.
#
#   bash scripts/setup_airflow.sh            # -> .venv-airflow next to this repo's .venv
#
# Environment:
#   AIRFLOW_VENV     where to create it (default: <repo>/.venv-airflow)
#   AIRFLOW_PYTHON   interpreter for the venv (default: the main .venv's base python 3.11, else python3.11)
#   AIRFLOW_CONSTRAINTS  a constraints file/URL to use; by default Airflow's published constraints are
#                    tried (10 s) and skipped when unreachable (installs from PyPI alone then)
#
# Idempotent: when the venv already holds the pinned versions it does nothing.
set -euo pipefail

AIRFLOW_VERSION=3.3.2
SPARK_PROVIDER_VERSION=6.3.4
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AIRFLOW_VENV:-$ROOT/.venv-airflow}"

pinned_ok() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$AIRFLOW_VERSION" "$SPARK_PROVIDER_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
want = {"apache-airflow": sys.argv[1], "apache-airflow-providers-apache-spark": sys.argv[2]}
ok = all(version(n) == v for n, v in want.items())
version("pytest")
sys.exit(0 if ok else 1)
PY
}

if pinned_ok; then
  echo "setup_airflow: $VENV already has apache-airflow==$AIRFLOW_VERSION and the Spark provider $SPARK_PROVIDER_VERSION"
  exit 0
fi

PY="${AIRFLOW_PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -f "$ROOT/.venv/pyvenv.cfg" ]; then
    home="$(sed -n 's/^home *= *//p' "$ROOT/.venv/pyvenv.cfg")"
    [ -x "$home/python3.11" ] && PY="$home/python3.11"
  fi
  [ -n "$PY" ] || PY="$(command -v python3.11 || command -v python3)"
fi
pyver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"

echo "setup_airflow: creating $VENV with $PY (Python $pyver)"
"$PY" -m venv "$VENV"
# Keep the venv out of git whatever the repo's .gitignore says (Python < 3.13 venvs have no .gitignore).
echo '*' > "$VENV/.gitignore"
"$VENV/bin/python" -m pip install -q --upgrade pip

constraint_args=()
if [ -n "${AIRFLOW_CONSTRAINTS:-}" ]; then
  constraint_args=(--constraint "$AIRFLOW_CONSTRAINTS")
else
  url="https://raw.githubusercontent.com/apache/airflow/constraints-${AIRFLOW_VERSION}/constraints-${pyver}.txt"
  tmp="$(mktemp)"
  if command -v curl >/dev/null && curl -fsSL --max-time 10 "$url" -o "$tmp" 2>/dev/null && [ -s "$tmp" ]; then
    # The constraints pin the provider too; the pin asked for here wins.
    grep -v -i '^apache-airflow-providers-apache-spark==' "$tmp" > "$tmp.c"
    constraint_args=(--constraint "$tmp.c")
    echo "setup_airflow: using Airflow's constraints $url"
  else
    echo "setup_airflow: Airflow's constraints are unreachable; installing from PyPI without them"
  fi
fi

"$VENV/bin/python" -m pip install -q "${constraint_args[@]}" \
  "apache-airflow==${AIRFLOW_VERSION}" \
  "apache-airflow-providers-apache-spark==${SPARK_PROVIDER_VERSION}" \
  "pytest>=8" "pyarrow>=15"

if ! pinned_ok; then
  echo "setup_airflow: install finished but the pinned versions are not importable in $VENV" >&2
  exit 1
fi
echo "setup_airflow: ready: $VENV/bin/airflow ($("$VENV/bin/airflow" version 2>/dev/null || echo '?'))"
