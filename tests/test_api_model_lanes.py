"""Model lanes are not used up for the server's lifetime: at the cap, the least recently used
idle lane is closed to open a new one, so made-up model names cannot lock out a real model
until a restart; a lane in use is never closed."""

from __future__ import annotations

import contextlib
from typing import Any

import httpx
import pytest

from api.app import MAX_MODELS, Services
from api.errors import ApiError
from contract.settings import Settings


def test_made_up_model_names_do_not_use_the_lanes_up(settings: Settings,
                                                     api_factory: Any) -> None:
    api = api_factory(settings.replace(api_models="*"))  # made-up names accepted
    with httpx.Client(base_url=api.url, timeout=30) as http:
        codes = [http.post("/v1/tasks", json={"text": "x", "model": f"typo{i}"}).status_code
                 for i in range(MAX_MODELS + 8)]
        assert codes == [202] * (MAX_MODELS + 8)
        real = http.post("/v1/tasks", json={"items": ["y"], "model": "sentiment-v2"})
        assert real.status_code == 202, real.text


def test_an_idle_lane_makes_room_and_a_busy_one_is_kept(settings: Settings) -> None:
    services = Services(settings)
    try:
        with contextlib.ExitStack() as held:
            for i in range(MAX_MODELS - 1):  # the default model's lane is the 32nd
                held.enter_context(services.lane(f"m{i}"))
            with pytest.raises(ApiError) as busy, services.lane("one-more"):
                pass
            assert busy.value.status == 429 and busy.value.code == "too_many_models"
        with services.lane("m0"):
            pass  # used again: now m1 is the least recently used
        with services.lane("one-more") as lane:
            assert lane.settings.model_name == "one-more"
        with services.lane(None) as default:
            assert default.submitter is services.submitter  # the default lane is kept
        assert services.settings_for("m1").model_name == "m1"
        with services._lanes_lock:
            assert "m1" not in services._lanes and "m0" in services._lanes
            assert len(services._lanes) == MAX_MODELS
    finally:
        services.close()
