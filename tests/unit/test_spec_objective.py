"""restoration.objective's defaults: RestoreLCC's the selection chose (the mix), the other methods' sft; an sft job
holds the distill-only settings at their sft values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.methods import DISTILL_ONLY, RESTORELCC_OBJECTIVE, RESTORELCC_SFT_WEIGHT, restoration_config

SFT = ("sft", DISTILL_ONLY["sft_weight"], DISTILL_ONLY["distill_tokens"], DISTILL_ONLY["distill_top_k"])


def settings(spec: dict) -> tuple:
    r = restoration_config(spec)
    return r.objective, r.sft_weight, r.distill_tokens, r.distill_top_k


def test_restorelcc_defaults_to_the_selected_mix_and_the_other_methods_to_sft() -> None:
    assert (RESTORELCC_OBJECTIVE, RESTORELCC_SFT_WEIGHT) == ("distill", 0.5)  # docs/objective.md chose "mixed"
    assert settings({}) == ("distill", 0.5, "response", 64)
    assert settings({"method": "restorelcc", "objective": "distill"}) == ("distill", 0.5, "response", 64)
    assert settings({"objective": "distill", "sft_weight": 0}) == ("distill", 0.0, "response", 64)  # pure distill
    for method in ("bias", "lora", "dora"):
        assert settings({"method": method}) == SFT, method
        assert settings({"method": method, "objective": "distill"}) == ("distill", 0.0, "response", 64), method


def test_an_sft_job_holds_the_distill_settings_at_their_sft_values() -> None:
    assert settings({"objective": "sft"}) == SFT  # not RestoreLCC's mix weight
    assert settings({"objective": "sft", "sft_weight": 0, "distill_top_k": 64}) == SFT
    for field, value in (("sft_weight", 0.5), ("distill_top_k", 8), ("distill_tokens", "all")):
        with pytest.raises(ValidationError, match=f"restoration.{field} applies to restoration.objective 'distill'"):
            restoration_config({"objective": "sft", field: value})
        with pytest.raises(ValidationError, match=f"restoration.{field} applies"):
            restoration_config({"method": "lora", field: value})
