"""The committed gRPC stubs are exactly what scripts/gen_proto.sh generates from the committed proto."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GENERATED = ("jlora_pb2.py", "jlora_pb2.pyi", "jlora_pb2_grpc.py")


def test_stubs_regenerate_byte_for_byte(tmp_path):
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "gen_proto.sh"), str(tmp_path)], check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in GENERATED:
        with open(os.path.join(ROOT, "jlora", "serve", "proto", name), "rb") as f:
            committed = f.read()
        with open(tmp_path / "jlora" / "serve" / "proto" / name, "rb") as f:
            assert f.read() == committed, f"{name} is stale: run scripts/gen_proto.sh"
