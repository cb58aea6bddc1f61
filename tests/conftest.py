"""Shared fixtures: the default service model and small helpers."""

from __future__ import annotations

import pytest
from infer_plan.core import ServiceModel


@pytest.fixture
def model() -> ServiceModel:
    return ServiceModel()
