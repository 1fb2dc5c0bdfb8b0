#!/usr/bin/env bash
# Set up micronet-torch on a fresh machine: Fashion-MNIST from Debian, a virtualenv at .venv with
# torch 2.14.1 / torchvision 0.29.1 and the package with its test extras. Safe to run again.
#
# Where torch comes from (environment variables):
#   TORCH_SPEC                 what pip installs [torch==2.14.1 torchvision==0.29.1]
#   MICRONET_TORCH_INDEX_URL   the wheel index to take it from, e.g. https://download.pytorch.org/whl/cpu for
#                              a CPU-only install (no nvidia-* wheels) [pip's default: this machine's setup]
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian's dataset-fashion-mnist"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null
    else
        echo "setup: warning: $FMNIST missing; run as root: apt-get update && apt-get install -y dataset-fashion-mnist" >&2
    fi
fi

# a C compiler builds the optional fused ONNX Runtime operator (micronet_torch.fused_ops) on first use, a C++ one
# the OpenVINO extension (micronet export --format openvino --fused-ops)
need=""
command -v cc >/dev/null || command -v gcc >/dev/null || need=" gcc"
command -v c++ >/dev/null || command -v g++ >/dev/null || need="$need g++"
if [ -n "$need" ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "setup: installing$need (for the fused Dynamic Shift-Max operators)"
        apt-get update -q >/dev/null
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $need >/dev/null
    else
        echo "setup: note: no$need; 'micronet export --fused-ops' will ask for one" >&2
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
INDEX_ARGS=()
if [ -n "${MICRONET_TORCH_INDEX_URL:-}" ]; then
    INDEX_ARGS=(--index-url "$MICRONET_TORCH_INDEX_URL")
fi
if [ -n "${MICRONET_TORCH_INDEX_URL:-}" ] || [ "$TORCH_SPEC" != "torch==2.14.1 torchvision==0.29.1" ] \
    || ! .venv/bin/python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC${MICRONET_TORCH_INDEX_URL:+ from $MICRONET_TORCH_INDEX_URL}"
    # shellcheck disable=SC2086  # TORCH_SPEC is a list of requirements
    .venv/bin/pip install -q ${INDEX_ARGS[@]+"${INDEX_ARGS[@]}"} $TORCH_SPEC 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
echo "setup: installing micronet-torch[test,all] (the deployment runtimes too)"
.venv/bin/pip install -q -e '.[test,all]' 2>&1 | { grep -v "^WARNING: Location" || true; }
.venv/bin/python -c "import micronet_torch, torch; print('setup: ok, micronet-torch', micronet_torch.__version__, 'torch', torch.__version__)"
echo "setup: run 'source .venv/bin/activate' to put micronet on your PATH, or call .venv/bin/micronet directly"
