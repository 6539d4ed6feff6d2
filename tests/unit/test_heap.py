"""protos/heap.py: glibc malloc keeps freed memory in the processes that move messages. Each check runs
in a fresh Python process (malloc's settings are the process's, for its whole life)."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt")

# Ten buffers of 48 MiB, each written whole and freed, as a message's bytes are: the page faults they took.
_FAULTS = """
import resource
from monim.protos import heap
tuned = heap.keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    buffer = b"x" * (48 << 20); del buffer
before = faults()
for _ in range(10):
    buffer = b"x" * (48 << 20); del buffer
print(tuned, faults() - before)
"""


def _run(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=120, check=True)
    return out.stdout.strip()


def test_freed_buffers_are_reused_without_page_faults():
    tuned, tuned_faults = _run(_FAULTS).split()
    untuned, untuned_faults = _run(_FAULTS, MONIM_KEEP_FREED_MEMORY="0").split()
    assert (tuned, untuned) == ("True", "False")
    # untuned: every buffer is a fresh mapping, 12,288 pages of 4 KiB each; tuned: the first buffer's pages again
    assert int(untuned_faults) > 10 * 4096
    assert int(tuned_faults) < int(untuned_faults) // 20


@pytest.mark.parametrize("off", ["0", "false", "off"])
def test_the_environment_turns_it_off(off):
    assert _run(_FAULTS, MONIM_KEEP_FREED_MEMORY=off).split()[0] == "False"


def test_a_client_of_a_server_tunes_its_process_and_an_in_process_one_does_not():
    code = """
from monim import MemoryClient
from monim.protos import heap
with MemoryClient(":memory:"):
    print(heap._done)
with MemoryClient("127.0.0.1:1", retries=0):  # the channel connects at the first call: none is made
    print(heap._done)
"""
    assert _run(code).split() == ["None", "True"]
