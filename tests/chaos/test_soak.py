"""Minutes of steady load while connections keep rotating: nothing fails, leaks or grows."""

from __future__ import annotations

import pytest

from ._scenarios import FRAMEWORKS, SOAK_S, Env, run_soak

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(SOAK_S) + 180)]


@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_soak(chaos_env: Env, framework: str) -> None:
    _, problems = run_soak(chaos_env, FRAMEWORKS[framework])
    assert not problems, "\n".join(problems)
