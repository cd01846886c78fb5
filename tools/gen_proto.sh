#!/usr/bin/env bash
# Regenerates the checked-in protobuf/gRPC Python code from protos/ into OUT_DIR
# (default client/_proto). Generated imports are rewritten to live under client._proto,
# so the SDK needs no top-level `transfer` package on sys.path.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT_DIR=${1:-client/_proto}
# protoc finds the mypy-protobuf plugins (protoc-gen-mypy*) on PATH, beside the interpreter.
PATH="$(dirname "$PY"):$PATH"
mkdir -p "$OUT_DIR"
"$PY" -m grpc_tools.protoc -I protos \
  --python_out="$OUT_DIR" --grpc_python_out="$OUT_DIR" --mypy_out="$OUT_DIR" --mypy_grpc_out="$OUT_DIR" \
  protos/transfer/v1/*.proto
for f in "$OUT_DIR"/transfer/v1/*.py "$OUT_DIR"/transfer/v1/*.pyi; do
  sed -i 's/^from transfer\.v1 import/from client._proto.transfer.v1 import/; s/^import transfer\.v1\./import client._proto.transfer.v1./' "$f"
done
touch "$OUT_DIR/__init__.py" "$OUT_DIR/transfer/__init__.py" "$OUT_DIR/transfer/v1/__init__.py"
