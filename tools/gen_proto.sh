#!/usr/bin/env bash
# Regenerates the checked-in protobuf/gRPC Python code from protos/ into OUT_DIR
# (default client/transfer_client/proto). protoc writes transfer/v1/*; the files are moved
# up into OUT_DIR and their imports rewritten to transfer_client.proto, so the SDK needs
# no top-level `transfer` package on sys.path.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT_DIR=${1:-client/transfer_client/proto}
# protoc finds the mypy-protobuf plugins (protoc-gen-mypy*) on PATH, beside the interpreter.
PATH="$(dirname "$PY"):$PATH"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m grpc_tools.protoc -I protos \
  --python_out="$WORK" --grpc_python_out="$WORK" --mypy_out="$WORK" --mypy_grpc_out="$WORK" \
  protos/transfer/v1/*.proto
mkdir -p "$OUT_DIR"
for f in "$WORK"/transfer/v1/*.py "$WORK"/transfer/v1/*.pyi; do
  sed -i 's/^from transfer\.v1 import/from transfer_client.proto import/; s/^import transfer\.v1\./import transfer_client.proto./' "$f"
  mv "$f" "$OUT_DIR/"
done
touch "$OUT_DIR/__init__.py"
