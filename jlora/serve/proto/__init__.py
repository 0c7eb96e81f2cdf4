"""The gRPC API (`jlora.proto`) and its generated stubs; regenerate with `scripts/gen_proto.sh`."""
