"""E2B's envd protocol, the contract ``qemubox serve`` implements: ``process.proto`` and
``filesystem.proto`` are E2B's own (github.com/e2b-dev/E2B, ``spec/envd/``, Apache License
2.0), unchanged; ``*_pb.py`` are generated from them by protoc-gen-py 0.6.0 (the messages
of the protobuf-py runtime), with ``regenerate.sh``. Do not edit the generated files."""
