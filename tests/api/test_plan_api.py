"""The memory plan stored at submit: made from a local model's config.json (both device kinds, since the API does not
know which worker will run the job), absent when the API cannot read the config."""

from __future__ import annotations

import json

LLAMA = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4, "intermediate_size": 512, "vocab_size": 1000, "dtype": "bfloat16",
         "tie_word_embeddings": True}


def test_a_local_model_gets_a_plan_at_submit(api):
    model = api.root / "models" / "tiny"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(LLAMA))
    job = api.create()
    plan = job["plan"]
    assert plan["source"] == "submit" and set(plan["devices"]) == {"cpu", "cuda"}
    cpu, cuda = plan["devices"]["cpu"], plan["devices"]["cuda"]
    params = 4 * (256 * 256 * 2 + 2 * 256 * 128 + 3 * 256 * 512 + 2 * 256) + 1000 * 256 + 256
    assert cpu["params"] == params and cpu["weight_bytes"] == 2 * params
    assert list(cpu["stages"]) == ["loading", "pruning", "evaluating", "exporting"]
    assert cpu["peak"]["device_bytes"] == cpu["peak"]["host_bytes"] > cpu["weight_bytes"]
    assert cuda["stages"]["pruning"]["host_bytes"] < cuda["stages"]["pruning"]["device_bytes"] + 2**31
    got = api.client.get(f"/v1/jobs/{job['id']}", headers=api.h()).json()
    assert got["plan"] == plan


def test_no_plan_when_the_config_cannot_be_read(api):
    model = api.root / "models" / "tiny"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    assert api.create()["plan"] is None
