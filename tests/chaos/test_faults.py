"""Each fault of docs/reliability.md hits a real app under load; every promise is checked after."""

from __future__ import annotations

import pytest

from ._scenarios import FRAMEWORKS, SCENARIOS, Env, run_scenario

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_fault_under_load(
    chaos_env: Env, framework: str, scenario: str, request: pytest.FixtureRequest
) -> None:
    if scenario == "postgres_restart":
        chaos_env.control = request.getfixturevalue("pg_control")
    _, problems = run_scenario(chaos_env, FRAMEWORKS[framework], scenario)
    assert not problems, "\n".join(problems)
