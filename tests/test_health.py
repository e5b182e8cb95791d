"""Health score: the seeds' weights (CPU 30 %, memory 30 %, response 25 %, errors 15 %)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vcoind.consensus.health import health_score, response_score

VECTORS = json.loads((Path(__file__).parent / "vectors" / "health.json").read_text())


@pytest.mark.parametrize("case", VECTORS, ids=[c["name"] for c in VECTORS])
def test_golden_vectors(case: dict[str, object]) -> None:
    args = case["input"]
    assert isinstance(args, dict)
    assert health_score(**args) == pytest.approx(case["expected"], abs=1e-6)


def test_response_score_shape() -> None:
    assert response_score(None) == 1.0
    assert response_score(0.05) == 1.0
    assert response_score(5.0) == 0.0
    assert response_score(60.0) == 0.0
    assert 0.49 < response_score(2.55) < 0.51


def test_monotone_in_each_input() -> None:
    base = health_score(50, 50, 1.0, 0.1)
    assert health_score(60, 50, 1.0, 0.1) < base
    assert health_score(50, 60, 1.0, 0.1) < base
    assert health_score(50, 50, 2.0, 0.1) < base
    assert health_score(50, 50, 1.0, 0.2) < base


def test_clamped_to_unit_interval() -> None:
    assert health_score(-10, -10, -1, -1) == 1.0
    assert health_score(500, 500, 500, 5) == 0.0
