"""The model card (``model/README.md``) of an exported model: what it was made from, how, what it measured, under
which licence, and how to load it.

Written from the job's spec and report, so every exported model carries its own description wherever it is
copied (the artifact store, a hand-off destination, the Hugging Face Hub). A README.md of the base model is never
carried over: the card replaces it, keeping only its licence.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from app.methods import PRUNING_METHODS
from app.schemas import JobSpec
from worker.errors import path_problem
from worker.run.summary import metric_rows

CARD = "README.md"
TAGS = ("restorelcc", "pruned", "sparse")
_COLUMNS = ("dense", "pruned", "restored")
_README_MAX_BYTES = 256 * 1024  # the front matter is at the top; never read a huge file whole
_PLAIN_YAML = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/+-]*$")


@dataclass(frozen=True)
class Licence:
    """The base model's licence as far as its directory tells: an identifier from its model card's front matter
    (with ``name``/``link`` for ``other``), and the licence files it ships (carried into the export: licences such as
    Llama's require a redistribution to include them)."""

    id: str | None = None
    name: str | None = None
    link: str | None = None
    files: tuple[str, ...] = ()
    copied: tuple[str, ...] = ()  # those of ``files`` copied beside the exported card


def source_dir(source: Any) -> Path | None:
    """The directory of a resolved model source (worker.model.load.ModelSource): the model directory, or the one
    holding its .gguf file. None when there is none to read."""
    path = getattr(source, "path", None)
    if path is None:
        return None
    path = Path(path)
    return path if path.is_dir() else path.parent


def is_hub_id(model_id: str) -> bool:
    """Whether a spec's model.id names a Hugging Face Hub model (worker.model.load treats everything that is not an
    absolute, ./, ../ or ~ path, or a .gguf file, as a hub id)."""
    return not (model_id.startswith(("/", ".", "~")) or model_id.lower().endswith(".gguf"))


def is_licence_file(name: str) -> bool:
    """LICENSE*, LICENCE*, NOTICE*, USE_POLICY* and *TERMS* files: what a model ships of its licence."""
    upper = name.upper()
    return upper.startswith(("LICENSE", "LICENCE", "NOTICE", "USE_POLICY")) or "TERMS" in upper


def read_licence(base_dir: Path | None) -> Licence:
    """The licence of the model in ``base_dir``: ``license:`` (and ``license_name``/``license_link``) from its
    README.md front matter, and the names of its licence files (:func:`is_licence_file`)."""
    if base_dir is None or path_problem(base_dir, "dir") is not None:
        return Licence()
    meta = _front_matter(base_dir / CARD)
    files = tuple(p.name for p in sorted(base_dir.iterdir())
                  if is_licence_file(p.name) and path_problem(p, "file") is None)
    licence = meta.get("license")
    if isinstance(licence, str) and licence.strip():
        return Licence(licence.strip(), _text(meta.get("license_name")), _text(meta.get("license_link")), files)
    return Licence(files=files)


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _front_matter(readme: Path) -> dict[str, Any]:
    """The YAML front matter of a model card ({} when there is none, or it does not parse)."""
    if path_problem(readme, "file") is not None:  # missing, a directory, or a FIFO that would block
        return {}
    try:
        with open(readme, "rb") as f:
            text = f.read(_README_MAX_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return {}
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    try:
        end = next(i for i, line in enumerate(lines[1:], 1) if line.strip() in ("---", "..."))
    except StopIteration:
        return {}
    import yaml

    try:
        meta = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def write_model_card(model_dir: Path, spec: JobSpec, report: dict[str, Any], base_dir: Path | None,
                     copy_files: bool = True) -> Path:
    """Write ``model_dir/README.md`` (replacing any there) from the job's spec and report; ``base_dir``: the base
    model's directory, where its licence is read. With ``copy_files`` (the directory is the model's own, not a folder
    a GGUF file merely sits in) its licence files are copied beside the card, each that can be read. Returns the
    card."""
    from worker.run.export import copy_files as copy

    licence = read_licence(base_dir)
    if copy_files and base_dir is not None:  # one that cannot be copied is named as the base model's instead
        licence = replace(licence, copied=tuple(copy(base_dir, Path(model_dir), licence.files)))
    path = Path(model_dir) / CARD
    path.write_text(model_card(spec, report, licence), encoding="utf-8")
    return path


def model_card(spec: JobSpec, report: dict[str, Any], licence: Licence) -> str:
    """The card's text: YAML front matter, then one section per topic."""
    model_id = spec.model.id
    restored = spec.restoration.method != "none"
    front = []
    if licence.id:
        front.append(f"license: {_yaml(licence.id)}")
        front += [f"{key}: {_yaml(value)}" for key, value in (("license_name", licence.name),
                                                               ("license_link", licence.link)) if value]
    if is_hub_id(model_id):
        front.append(f"base_model: {_yaml(model_id)}")
    front.append("library_name: transformers")
    front.append("tags:")
    front += [f"- {tag}" for tag in TAGS]

    name = _display_name(model_id)
    out = ["---", *front, "---", "", f"# {name}, pruned{' and restored' if restored else ''} with restorelcc", ""]
    out += ["## Base model", "", _base_model(spec, report), ""]
    out += ["## Pruning", "", *_pruning(spec, report), ""]
    out += ["## Restoration", "", *_restoration(spec, report), ""]
    out += ["## Measured sparsity", "", _sparsity(report), ""]
    out += ["## Metrics", "", *_metrics(report), ""]
    out += ["## Licence", "", _licence(licence), ""]
    out += ["## Usage", "", *_usage(report, restored)]
    return "\n".join(out).rstrip("\n") + "\n"


def _yaml(value: str) -> str:
    """A YAML scalar: plain when it is a simple word, else a JSON string (which YAML reads as the same string)."""
    return value if _PLAIN_YAML.match(value) else json.dumps(value)


def _display_name(model_id: str) -> str:
    """A hub id as it is; a local path by its last part only (the service's own paths stay out of the card)."""
    if is_hub_id(model_id):
        return model_id
    name = Path(model_id.rstrip("/")).name or model_id
    return name.removesuffix(".gguf").removesuffix(".GGUF")


def _base_model(spec: JobSpec, report: dict[str, Any]) -> str:
    model_id = spec.model.id
    if is_hub_id(model_id):
        commit = ((report.get("model") or {}).get("commits") or {}).get("model.id")
        named = [f"revision `{spec.model.revision}`"] if spec.model.revision and spec.model.revision != commit else []
        named += [f"commit `{commit}`"] if commit else []
        revision = f" ({', '.join(named)})" if named else ""
        text = f"[`{model_id}`](https://huggingface.co/{model_id}){revision} from the Hugging Face Hub"
    else:
        text = f"`{_display_name(model_id)}`, a local model"
    if spec.model.gguf_file or model_id.lower().endswith(".gguf"):
        text += " (a GGUF file, dequantized)"
    if spec.pruning.method == "none":
        text += ", given already pruned"
    return text + "."


def _pruning(spec: JobSpec, report: dict[str, Any]) -> list[str]:
    p = spec.pruning
    if p.method == "none":
        return ["None here: the base model was given already pruned."]
    done = report.get("pruning") or {}
    lines = [f"- method: `{done.get('method', p.method)}`",
             f"- sparsity: {100 * float(done.get('sparsity', p.sparsity)):g}% of the weights of each pruned linear "
             "layer",
             f"- pattern: {done.get('pattern', p.pattern)}"]
    if PRUNING_METHODS[p.method].needs_calibration:
        lines.append(f"- calibration: {p.calibration_samples} sequences of {p.seq_len} tokens")
    return lines


def _restoration(spec: JobSpec, report: dict[str, Any]) -> list[str]:
    config = spec.restoration.model_dump(mode="json")
    method = config.pop("method")
    if method == "none":
        return ["None: the pruned weights are exported as they are."]
    settings = ", ".join(f"{key}={_value(value)}" for key, value in config.items() if value is not None)
    lines = [f"- method: `{method}`, merged into the weights (pruned zeros kept)"]
    if settings:
        lines.append(f"- settings: {settings}")
    done = report.get("restoration") or {}
    if done.get("trainable_params") is not None:
        lines.append(f"- trainable parameters: {int(done['trainable_params']):,}")
    if done.get("steps") is not None:
        tokens = f" on {int(done['train_tokens']):,} tokens" if done.get("train_tokens") is not None else ""
        lines.append(f"- training: {done['steps']} optimizer steps{tokens}")
    if done.get("chosen_heads"):
        lines.append(f"- attention heads restored: {len(done['chosen_heads'])}")
    return lines


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _sparsity(report: dict[str, Any]) -> str:
    s = report.get("sparsity") or {}
    if s.get("overall") is None:
        return "Not measured."
    counts = (f" ({int(s['zeros']):,} of {int(s['total']):,} weights)"
              if s.get("zeros") is not None and s.get("total") is not None else "")
    return f"{100 * float(s['overall']):.2f}% of the weights of the pruned linear layers are zero{counts}."


def _metrics(report: dict[str, Any]) -> list[str]:
    metrics = report.get("metrics") or {}
    rows = metric_rows(metrics)
    columns = [i for i, col in enumerate(_COLUMNS) if any(vals[i] is not None for _, vals in rows)]
    if not rows or not columns:
        return ["No evaluation was run."]
    lines = ["| metric | " + " | ".join(_COLUMNS[i] for i in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for label, vals in rows:
        cells = " | ".join(f"{vals[i]:.4g}" if vals[i] is not None else "—" for i in columns)
        lines.append(f"| {label} | {cells} |")
    lines += ["", "ppl: perplexity (lower is better); acc, acc_norm: accuracy on multiple-choice tasks."]
    return lines


def _licence(licence: Licence) -> str:
    names = ", ".join(f"`{f}`" for f in licence.files)
    copied = ", ".join(f"`{f}`" for f in licence.copied)
    if licence.id:
        extra = ", ".join(x for x in (licence.name, licence.link) if x)
        files = f" The base model's licence files are copied beside this card: {copied}." if copied else ""
        return (f"This model is derived from the base model and is under its licence: `{licence.id}`"
                f"{f' ({extra})' if extra else ''}.{files}")
    if licence.files:
        where = f", copied beside this card: {copied}" if copied else ""
        return (f"This model is derived from the base model and is under its licence: see {names} of the base "
                f"model{where}.")
    return "This model is derived from the base model: see the base model's licence, which applies to it too."


def _usage(report: dict[str, Any], restored: bool) -> list[str]:
    merged = "The restoration is merged into the weights and the" if restored else "The"
    lines = [
        f"{merged} pruned weights are stored as zeros in ordinary tensors, so plain transformers loads the model; "
        "nothing extra is needed at inference:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'path = "path/to/this/model"',
        "model = AutoModelForCausalLM.from_pretrained(path)",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "```",
    ]
    if (report.get("output") or {}).get("primary") == "adapter/":
        lines += ["", "The job also exported the unmerged adapter in `adapter/` beside this directory. It applies to "
                      "the pruned model, not the base model (`PeftModel.from_pretrained(pruned_model, \"adapter\")`): "
                      "a job with the same pruning and `restoration.method: \"none\"` exports that model."]
    return lines
