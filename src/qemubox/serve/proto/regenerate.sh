#!/usr/bin/env bash
# Regenerates *_pb.py from the .proto files beside it. Needs protoc (Debian: protobuf-compiler,
# and libprotobuf-dev for google/protobuf/timestamp.proto) and protoc-gen-py==0.6.0 on PATH.
set -euo pipefail
cd "$(dirname "$0")"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mkdir -p "$out/in/process" "$out/in/filesystem" "$out/gen"
cp process.proto "$out/in/process/"
cp filesystem.proto "$out/in/filesystem/"
protoc -I "$out/in" -I /usr/include --py_out="$out/gen" \
  "$out/in/process/process.proto" "$out/in/filesystem/filesystem.proto"
cp "$out/gen/process/process_pb.py" "$out/gen/filesystem/filesystem_pb.py" .
