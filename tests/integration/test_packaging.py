"""The wheel as a user installs it: one import name, a thin client, extras by role.

The wheel is built from this checkout and installed into fresh virtual environments outside it;
the scripts run from a temporary directory, so nothing of the checkout is importable to them.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "constraints.txt"
HEAVY = ("ray", "faiss", "torch", "transformers", "pyarrow")

pytestmark = pytest.mark.slow


def _run(command, cwd, timeout_s=900, env=None):
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                            env=dict(clean, **(env or {})))
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, ROOT], cwd=out)
    (built,) = out.glob("monim_store-*.whl")
    return built


def _venv(path: pathlib.Path) -> pathlib.Path:
    _run([sys.executable, "-m", "venv", path], cwd=path.parent)
    return path / "bin" / "python"


def _script(python: pathlib.Path, cwd: pathlib.Path, source: str, **values) -> dict:
    """Runs a script in the venv, from cwd, with VALUES as JSON in argv[1]; returns its last line as JSON."""
    script = cwd / "script.py"
    script.write_text(textwrap.dedent(source))
    output = _run([python, script, json.dumps(values)], cwd=cwd)
    return json.loads(output.strip().splitlines()[-1])


def test_wheel_has_one_top_level_name_and_carries_the_contract(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        if top_level:
            assert archive.read(top_level[0]).decode().split() == ["monim"]
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"monim"}
    for required in ("monim/protos/memory.proto", "monim/protos/memory_pb2.py", "monim/protos/memory_pb2_grpc.py",
                     "monim/datastore/store.py", "monim/workers/cli.py", "monim/model_client/client.py"):
        assert required in names, f"{required} is missing from the wheel"


CLIENT_SCRIPT = """
    import json, sys
    import numpy as np
    values = json.loads(sys.argv[1])
    from monim import MemoryClient, NotFound
    import monim
    with MemoryClient(values["address"]) as client:
        client.create_namespace(values["namespace"], dim=8, value_dim=4)
        rng = np.random.default_rng(0)
        keys = rng.standard_normal((50, 8)).astype("float32")
        ids = client.add(values["namespace"], keys, tokens=np.arange(50),
                         values=rng.standard_normal((50, 4)).astype("float32"))
        found = client.search(values["namespace"], keys[:5], k=3)
        try:
            client.get(values["namespace"], [10**9])
            not_found = False
        except NotFound:
            not_found = True
    try:
        monim.MoNIMLayer
        layer_error = ""
    except ImportError as error:
        layer_error = str(error)
    print(json.dumps({"first": found.ids[:, 0].tolist(), "ids": ids[:5].tolist(), "not_found": not_found,
                      "heavy": sorted(m for m in %r if m in sys.modules), "layer_error": layer_error,
                      "file": monim.__file__}))
""" % (HEAVY,)

LAYER_SCRIPT = """
    import json, sys
    import numpy as np
    import torch
    values = json.loads(sys.argv[1])
    from monim import MemoryClient, MoNIMLayer
    with MemoryClient(values["address"]) as client:
        ids = np.asarray(values["ids"])
        before = client.get(values["namespace"], ids).values
        layer = MoNIMLayer(client, values["namespace"], k=3, temperature=1.0)
        hidden = torch.randn(2, 3, 8, requires_grad=True)
        memory = layer(hidden)
        (memory * torch.randn_like(memory)).sum().backward()
        after = client.get(values["namespace"], ids).values
    print(json.dumps({"shape": list(memory.shape), "grad": float(hidden.grad.abs().sum()),
                      "changed": int((np.abs(after - before).sum(1) > 0).sum())}))
"""


def test_thin_client_install_then_the_torch_extra(wheel, server_address, namespace_name, tmp_path):
    python = _venv(tmp_path / "venv")
    outside = tmp_path / "work"
    outside.mkdir()
    _run([python, "-m", "pip", "install", "-q", "-c", CONSTRAINTS, wheel], cwd=outside)

    base = _script(python, outside, CLIENT_SCRIPT, address=server_address, namespace=namespace_name)
    assert str(tmp_path / "venv") in base["file"], "monim was imported from somewhere other than the venv"
    assert base["first"] == base["ids"]  # each key is its own nearest neighbour
    assert base["not_found"]
    assert base["heavy"] == [], f"the client imported {base['heavy']}"
    assert "monim-store[torch]" in base["layer_error"]

    _run([python, "-m", "pip", "install", "-q", "-c", CONSTRAINTS, f"{wheel}[torch]"], cwd=outside)
    layer = _script(python, outside, LAYER_SCRIPT, address=server_address, namespace=namespace_name,
                    ids=list(range(50)))
    assert layer["shape"] == [2, 3, 4]
    assert layer["grad"] > 0
    assert layer["changed"] > 0, "the backward did not update any value row"


def test_monim_command_runs_from_the_installed_wheel(wheel, tmp_path):
    """The server extra's dependencies come from this environment (a .pth file), monim from the wheel."""
    python = _venv(tmp_path / "venv")
    site = next((tmp_path / "venv" / "lib").glob("python*/site-packages"))
    dev_site = next(p for p in sys.path if p.endswith("site-packages") and pathlib.Path(p).is_dir())
    (site / "dev-deps.pth").write_text(dev_site + "\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", wheel], cwd=tmp_path)
    monim = tmp_path / "venv" / "bin" / "monim"
    assert "--shards" in _run([monim, "serve", "--help"], cwd=tmp_path)
    where = _run([python, "-c", "import monim.workers.embedded as e, monim.protos as p; print(e.__file__, p.__file__)"],
                 cwd=tmp_path)
    assert str(tmp_path / "venv") in where and str(ROOT) not in where
