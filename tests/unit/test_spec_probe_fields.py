"""The probe's spec fields: restoration.negatives chooses how negatives are found; restoration.components is gone
(and a spec naming it is told why), because the summary component cannot change a standardised probe's scores."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from app.errors import validation_error
from app.methods import RestoreLCCConfig, restoration_config
from app.schemas import JobSpec
from worker.restore.restorelcc.probe import probe_features, train_probes


def _spec(**restoration) -> dict:
    return {"model": {"id": "org/model"}, "data": {"train": "/data/train.jsonl"}, "restoration": restoration}


def test_negatives_default_to_the_embedding_model_and_tfidf_is_opt_in():
    assert restoration_config({}).negatives == "minilm"
    assert restoration_config({"negatives": "tfidf"}).negatives == "tfidf"
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate(_spec(negatives="auto"))
    api = validation_error(err.value.errors())
    assert api.status == 422 and api.field == "restoration.negatives"


def test_a_spec_naming_components_is_refused_with_the_reason():
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate(_spec(components=10))
    api = validation_error(err.value.errors())
    assert api.status == 422 and api.code == "invalid_spec"
    assert api.field == "restoration.components"
    assert "cancels the summary component" in api.message and "drop the field" in api.message
    assert "components" not in RestoreLCCConfig.model_fields


def test_the_summary_component_cannot_change_head_scores():
    """Why the field went: c is one constant added to every sample's pruned half, which standardisation removes."""
    g = torch.Generator().manual_seed(0)
    n, layers, heads, d = 40, 2, 3, 8
    pruned, pos, neg = (torch.randn(n, layers, heads, d, generator=g) for _ in range(3))
    pos = pos + 0.5  # the positives differ from the negatives, so the scores are not all chance
    scores = []
    for c in (torch.zeros(layers * heads, d), 5 * torch.randn(layers * heads, d, generator=g)):
        x, y, groups = probe_features(pruned, c, pos, neg)
        scores.append(train_probes(x, y, groups, (layers, heads), seed=0, steps=100))
    assert torch.equal(scores[0].accuracy, scores[1].accuracy)
    torch.testing.assert_close(scores[0].val_loss, scores[1].val_loss, atol=2e-3, rtol=2e-3)  # float rounding only
    assert scores[0].accuracy.mean() > 0.6  # the probe did learn something the constant could have shifted
