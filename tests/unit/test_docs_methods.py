"""docs/api.md's table of restoration methods says what the catalogue says: each method's own settings, its
default learning rate, and whether it probes and trains."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

from app.methods import TrainingConfig, restoration_config, restoration_method, restoration_methods

DOC = Path(__file__).parents[2] / "docs" / "api.md"


def table() -> dict[str, list[str]]:
    text = DOC.read_text()
    section = text[text.index("### Restoration methods"):text.index("### Limits")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.match(r"`(\w+)`", cells[0]) if len(cells) == 4 else None
        if m:
            rows[m.group(1)] = cells
    return rows


def test_every_built_in_method_has_a_row_that_matches_the_catalogue():
    rows = table()
    assert set(rows) == set(restoration_methods())
    shared = set(TrainingConfig.model_fields)
    for name, (_, own, lr, stages) in rows.items():
        config = restoration_config({"method": name})
        fields = set(type(config).model_fields)
        expected_own = fields - shared if restoration_method(name).trains else set()
        assert set(re.findall(r"`(\w+)`", own)) == expected_own, name
        default = restoration_method(name).default_lr
        assert (lr == "—") if default is None else float(lr) == default, name
        assert ("training" in stages) == restoration_method(name).trains, name
        assert ("probing" in stages) == ("head_selection" in fields), name


def test_the_shared_settings_are_listed():
    text = DOC.read_text()
    start = text.index("### Restoration methods")
    section = text[start:text.index("| method |", start)]
    listed = set(re.findall(r"`(\w+)`", section)) - {"restoration", "method"}
    fields = set(TrainingConfig.model_fields) - {"method"}
    choices = {str(c) for f in TrainingConfig.model_fields.values() for c in get_args(f.annotation)}
    assert fields <= listed
    assert listed - fields <= choices  # the rest are the values a setting takes
