"""The README's job-spec block shows the defaults the service really uses."""

from __future__ import annotations

import json
import re
from pathlib import Path

from app.schemas import JobSpec

README = Path(__file__).parents[2] / "README.md"
SECTIONS = ("pruning", "restoration", "output", "resources")  # model, data and evaluation show example values


def readme_spec() -> dict:
    text = README.read_text()
    block = re.search(r"## The job spec\s+```json\n(.*?)```", text, re.S)
    assert block, "README has no job-spec block"
    return json.loads(block.group(1))


def test_readme_spec_block_shows_the_defaults():
    shown = readme_spec()
    # field defaults as declared (lr: null means "the method's default", filled in by a validator)
    models = {name: JobSpec.model_fields[name].get_default(call_default_factory=True) for name in SECTIONS}
    defaults = {name: {key: f.get_default(call_default_factory=True) for key, f in type(m).model_fields.items()}
                for name, m in models.items()}  # restoration: the default method's (RestoreLCC's) settings
    defaults["seed"] = JobSpec.model_fields["seed"].default
    compared = 0
    for section in SECTIONS:
        for key, value in shown[section].items():
            assert key in defaults[section], f"README shows {section}.{key}, which the spec does not have"
            if isinstance(value, str) and " | " in value:  # the choices, not a value
                options = value.split(" | ")
                assert str(defaults[section][key]) in options or section == "pruning" and key == "pattern"
                continue
            default = defaults[section][key]
            assert value == default, f"{section}.{key}: README {value!r}, default {default!r}"
            compared += 1
    assert shown["seed"] == defaults["seed"]
    assert compared >= 15
