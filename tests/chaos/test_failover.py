"""Failover under HTTP load, both frameworks on real servers: no acknowledged write lost."""

from __future__ import annotations

import pytest

from tests._replication import Replication

from ._failover import APPS, SCENARIOS, run_failover

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("framework", sorted(APPS))
def test_failover_under_load(replication: Replication, framework: str, scenario: str) -> None:
    row, problems = run_failover(replication, APPS[framework], scenario)
    print(row)
    assert not problems, "\n".join(problems)
