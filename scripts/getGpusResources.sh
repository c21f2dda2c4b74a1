#!/usr/bin/env bash
# Spark GPU discovery script: prints the GPUs of this host in the format Spark expects, e.g.
#   {"name": "gpu", "addresses": ["0", "1"]}
# Point spark.executor.resource.gpu.discoveryScript (and spark.worker.resource.gpu.discoveryScript
# on standalone workers) at this file. Prints an empty address list when no GPU is present.
set -euo pipefail
if command -v nvidia-smi >/dev/null 2>&1; then
  addrs=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | sed -e 's/^ *//' -e 's/.*/"&"/' | paste -sd, -)
else
  addrs=""
fi
echo "{\"name\": \"gpu\", \"addresses\": [${addrs}]}"
