"""The model card every export carries (model/README.md): written from a real tiny run's spec and report, replacing
the base model's README while keeping its licence; and how the base model's licence is found."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from app.schemas import JobSpec
from worker.run.model_card import Licence, model_card, read_licence, write_model_card

BASE_README = """---
license: mit
language: en
---

# The base model's own card: BASE-CARD-MARKER
"""


def plain_spec(model_id: str) -> JobSpec:
    """Magnitude pruning, no restoration: a spec that needs no data files."""
    return JobSpec.model_validate({"model": {"id": model_id}, "pruning": {"method": "magnitude"},
                                   "restoration": {"method": "none"}})


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, sep, _ = card[4:].partition("\n---\n")
    assert sep, "front matter not closed"
    return yaml.safe_load(head)


@pytest.fixture(scope="module")
def tiny_run(tiny_assets, tmp_path_factory):
    """One restored tiny job whose base model directory has a README.md with a licence: (out dir, report, spec)."""
    from worker.reporting import NullReporter
    from worker.run.pipeline import run_pipeline

    base = tmp_path_factory.mktemp("base") / "tiny-base"
    shutil.copytree(tiny_assets.model, base)
    (base / "README.md").write_text(BASE_README, encoding="utf-8")
    (base / "LICENSE").write_text("the base model's licence text\n", encoding="utf-8")
    (base / "USE_POLICY.md").write_text("the base model's use policy\n", encoding="utf-8")
    spec = JobSpec.model_validate(tiny_assets.spec(model=str(base), restore=True))
    out = tmp_path_factory.mktemp("run") / "out"
    report = run_pipeline(spec, out, NullReporter())
    return out, report, spec


def test_a_run_writes_a_card_from_its_report_and_spec(tiny_run):
    out, report, spec = tiny_run
    card = (out / "model" / "README.md").read_text(encoding="utf-8")
    meta = front_matter(card)
    assert meta == {"license": "mit", "library_name": "transformers", "tags": ["restorelcc", "pruned", "sparse"]}
    assert "base_model" not in meta  # a local path is no hub id
    assert "BASE-CARD-MARKER" not in card  # the base model's own card is replaced, its licence kept
    assert "# tiny-base, pruned and restored with restorelcc" in card
    assert str(spec.model.id) not in card  # the service's own paths stay out of the card
    assert "- method: `magnitude`" in card and "- sparsity: 50% of the weights" in card
    assert "- pattern: unstructured" in card
    assert "- method: `restorelcc`" in card and "heads=0.5" in card and "max_steps=4" in card
    assert f"- trainable parameters: {report['restoration']['trainable_params']:,}" in card
    s = report["sparsity"]
    assert f"{100 * s['overall']:.2f}% of the weights" in card and f"{s['zeros']:,} of {s['total']:,}" in card
    m = report["metrics"]
    row = (f"| text.ppl | {m['dense']['text']['ppl']:.4g} | {m['pruned']['text']['ppl']:.4g} | "
           f"{m['restored']['text']['ppl']:.4g} |")
    assert "| metric | dense | pruned | restored |" in card and row in card
    assert "under its licence: `mit`" in card
    assert "AutoModelForCausalLM.from_pretrained(path)" in card
    # the licence files travel with the model (Llama's licence requires redistributions to include its own)
    assert (out / "model" / "LICENSE").read_text(encoding="utf-8") == "the base model's licence text\n"
    assert (out / "model" / "USE_POLICY.md").read_text(encoding="utf-8") == "the base model's use policy\n"
    assert "copied beside this card: `LICENSE`, `USE_POLICY.md`" in card


def test_the_card_does_not_disturb_loading_with_plain_transformers(tiny_run):
    from transformers import AutoModelForCausalLM

    out, report, _ = tiny_run
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    name, fraction = next(iter(report["sparsity"]["modules"].items()))
    assert abs(float((model.get_submodule(name).weight == 0).float().mean()) - fraction) < 1e-9


def test_a_hub_model_names_its_base_model_and_only_the_columns_measured():
    spec = JobSpec.model_validate({"model": {"id": "org/some-model", "revision": "v1"},
                                   "pruning": {"method": "magnitude", "pattern": "2:4"},
                                   "restoration": {"method": "none"}})
    report = {"metrics": {"pruned": {"boolq": {"acc": 0.625}}}, "sparsity": {"overall": 0.5}}
    card = model_card(spec, report, Licence("apache-2.0"))
    meta = front_matter(card)
    assert meta["base_model"] == "org/some-model" and meta["license"] == "apache-2.0"
    assert "(revision `v1`)" in card and "- pattern: 2:4" in card
    assert "| metric | pruned |" in card and "| boolq.acc | 0.625 |" in card and "dense |" not in card
    assert "None: the pruned weights are exported as they are." in card
    assert "restoration is merged" not in card
    pinned = model_card(spec, {**report, "model": {"commits": {"model.id": "c" * 40}}}, Licence("apache-2.0"))
    assert f"(revision `v1`, commit `{'c' * 40}`)" in pinned  # the commit the weights were read at


def test_an_other_licence_keeps_its_name_and_link_and_yaml_stays_valid(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text('---\nlicense: other\nlicense_name: "acme: research only"\n'
                                    "license_link: https://example.com/terms?a=1\n---\n# x\n", encoding="utf-8")
    licence = read_licence(base)
    assert licence == Licence("other", "acme: research only", "https://example.com/terms?a=1")
    spec = plain_spec("/models/x")
    meta = front_matter(model_card(spec, {}, licence))
    assert (meta["license"], meta["license_name"], meta["license_link"]) == (
        "other", "acme: research only", "https://example.com/terms?a=1")


def test_licence_files_are_named_when_the_readme_gives_none(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("# no front matter\nlicense: not-this\n", encoding="utf-8")
    for name in ("LICENSE.txt", "GEMMA_TERMS_OF_USE.md", "config.json"):
        (base / name).write_text("x", encoding="utf-8")
    (base / "LICENCE-dir").mkdir()  # a directory is no licence file
    licence = read_licence(base)
    assert licence == Licence(files=("GEMMA_TERMS_OF_USE.md", "LICENSE.txt"))
    spec = plain_spec(str(base))
    card = model_card(spec, {}, licence)
    assert "license" not in front_matter(card)
    assert "see `GEMMA_TERMS_OF_USE.md`, `LICENSE.txt` of the base model." in card  # none copied
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    card = write_model_card(model_dir, spec, {}, base).read_text(encoding="utf-8")
    assert "of the base model, copied beside this card: `GEMMA_TERMS_OF_USE.md`, `LICENSE.txt`." in card
    assert (model_dir / "LICENSE.txt").read_text(encoding="utf-8") == "x"
    gguf_dir = tmp_path / "gguf-export"  # a GGUF's folder may be shared: its licence files are named, not copied
    gguf_dir.mkdir()
    card = write_model_card(gguf_dir, spec, {}, base, copy_files=False).read_text(encoding="utf-8")
    assert "copied" not in card and not (gguf_dir / "LICENSE.txt").exists()


def test_unknown_licence_and_unreadable_front_matter(tmp_path):
    assert read_licence(None) == Licence()
    assert read_licence(tmp_path / "missing") == Licence()
    base = tmp_path / "base"
    base.mkdir()
    assert read_licence(base) == Licence()
    (base / "README.md").write_text("---\nlicense: [unclosed\n---\n", encoding="utf-8")  # YAML that does not parse
    assert read_licence(base) == Licence()
    spec = plain_spec(str(base))
    card = model_card(spec, {}, read_licence(base))
    assert "see the base model's licence" in card and "No evaluation was run." in card


def test_a_fifo_readme_or_licence_is_never_opened(tmp_path):
    """A FIFO in a model directory would block whoever opens it: it is skipped, not read."""
    base = tmp_path / "base"
    base.mkdir()
    os.mkfifo(base / "README.md")
    os.mkfifo(base / "LICENSE")
    (base / "LICENSE.md").write_text("x", encoding="utf-8")
    assert read_licence(base) == Licence(files=("LICENSE.md",))


def test_write_model_card_replaces_a_readme_already_there(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "README.md").write_text(BASE_README, encoding="utf-8")
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text(BASE_README, encoding="utf-8")
    spec = plain_spec(str(base))
    path = write_model_card(model_dir, spec, {}, base)
    card = path.read_text(encoding="utf-8")
    assert path == model_dir / "README.md" and "BASE-CARD-MARKER" not in card
    assert front_matter(card)["license"] == "mit"
