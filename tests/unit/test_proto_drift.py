"""The checked-in generated code must be what protos/generate.sh makes from memory.proto."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GENERATED = ["memory_pb2.py", "memory_pb2.pyi", "memory_pb2_grpc.py"]


def test_generated_code_is_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools")
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to run protos/generate.sh")
    env_path = str(pathlib.Path(sys.executable).parent)
    subprocess.run(["bash", str(ROOT / "protos" / "generate.sh"), str(tmp_path)], check=True,
                   env={"PATH": f"{env_path}:/usr/bin:/bin"})
    for name in GENERATED:
        fresh = (tmp_path / "protos" / name).read_text()
        checked_in = (ROOT / "protos" / name).read_text()
        assert fresh == checked_in, f"protos/{name} is stale: run `make proto` (bash protos/generate.sh) and commit"
