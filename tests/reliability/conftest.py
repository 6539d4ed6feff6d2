"""The reliability suite's deployment: in this process, over gRPC on 127.0.0.1, without Ray
(tests/reliability/local_deployment.py), seeded once per test module; and a table of the status
codes its generated requests got, printed at the end of the run."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from tests.reliability.local_deployment import LocalDeployment, seed

LEDGER = pytest.StashKey[collections.Counter]()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(LocalDeployment, World): 2 shards with a durable data dir, and the seeded namespaces."""
    deployment = LocalDeployment(str(tmp_path_factory.mktemp("reliability")))
    deployment.start()
    try:
        yield deployment, seed(deployment.stub, np.random.default_rng(15), deployment.shards)
    finally:
        deployment.stop()


@pytest.fixture(scope="session")
def ledger(request) -> collections.Counter:
    """(kind, RPC, status code) -> requests sent."""
    return request.config.stash.setdefault(LEDGER, collections.Counter())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = config.stash.get(LEDGER, None)
    if not counts:
        return
    by_code = collections.Counter()
    for (_, _, code), n in counts.items():
        by_code[code] += n
    kinds = collections.Counter()
    for (kind, _, _), n in counts.items():
        kinds[kind] += n
    terminalreporter.section("hostile input")
    terminalreporter.write_line(f"generated requests: {sum(counts.values())} "
                                f"({', '.join(f'{kind}: {n}' for kind, n in sorted(kinds.items()))})")
    terminalreporter.write_line("answered: " + ", ".join(f"{code} {n}" for code, n in by_code.most_common()))
