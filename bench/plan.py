"""What the comparison and the search run: pruning settings, restoration methods, the shared budget, job specs
and their fingerprints. Pure: no torch, no file I/O. Every run is one (setting, method, seed); a setting's pruned
model is made once (pruning seed 0) and every method restores that same model.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def contract() -> dict[str, Any]:
    """What the bench reads from the job-spec contract, in one place: the service default's heads, directions
    and lr, the lr schedules a spec accepts, and each restoration method's fields (a field of another method
    is refused)."""
    from app.methods import SCHEDULES, RestoreLCCConfig, default_lr, restoration_methods

    fields = RestoreLCCConfig.model_fields
    return {"heads": fields["heads"].default, "directions": fields["directions"].default,
            "lr": default_lr("restorelcc"), "schedules": tuple(SCHEDULES),
            "fields": {name: tuple(m.config.model_fields) for name, m in restoration_methods().items()}}


@dataclass(frozen=True)
class Setting:
    key: str  # folder and --only name
    label: str
    pruning: dict[str, Any]


SETTINGS: tuple[Setting, ...] = (
    Setting("wanda-50", "Wanda 50% unstructured", {"method": "wanda", "sparsity": 0.5}),
    Setting("sparsegpt-2-4", "SparseGPT 2:4", {"method": "sparsegpt", "pattern": "2:4"}),
)


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    restoration: dict[str, Any]
    lr: str  # which learning-rate flag: "offsets" (RestoreLCC and bias) or "adapter" (LoRA and DoRA)
    main: bool  # repeated over every seed
    forms: tuple[str, ...] = ("",)  # rows one run produces: "" (the restored model) or "unmerged"/"merged"
    fixed: tuple[tuple[str, Any], ...] = ()  # restoration settings that override the shared budget


def _service_default() -> tuple[Method, ...]:
    """RestoreLCC exactly as a job that leaves heads and lr unset gets it (the searched recommendation), and
    the paper's two ablations at its head count and lr: random heads, and bias only on its probed heads."""
    c = contract()
    heads, directions, lr = c["heads"], c["directions"], c["lr"]
    fixed = (("heads", heads), ("lr", lr))
    top = (("directions", directions),)
    what = f"heads {heads:g}" + (f", directions {directions:g}" if directions is not None else "") + f", lr {lr:g}"
    return (
        Method("restorelcc-default", f"RestoreLCC (service default: {what})",
               {"method": "restorelcc", "head_selection": "probe"}, "offsets", True, fixed=fixed + top),
        Method("restorelcc-default-random", f"RestoreLCC (random heads; {what})",
               {"method": "restorelcc", "head_selection": "random"}, "offsets", False, fixed=fixed + top),
        Method("bias-default", f"bias only (the service default's heads; heads {heads:g}, lr {lr:g})",
               {"method": "bias", "head_selection": "probe"}, "offsets", False, fixed=fixed),
    )


METHODS: tuple[Method, ...] = (
    Method("restorelcc", "RestoreLCC (probed heads)", {"method": "restorelcc", "head_selection": "probe"},
           "offsets", True),
    Method("restorelcc-random", "RestoreLCC (random heads)", {"method": "restorelcc", "head_selection": "random"},
           "offsets", False),
    Method("bias-probe", "bias only (RestoreLCC's heads)", {"method": "bias", "head_selection": "probe"},
           "offsets", False),
    Method("bias-all", "bias only (all heads)", {"method": "bias", "head_selection": "all"}, "offsets", True),
    Method("lora", "LoRA r=8 q,v", {"method": "lora"}, "adapter", True, ("unmerged", "merged")),
    Method("dora", "DoRA r=8 q,v", {"method": "dora"}, "adapter", False, ("unmerged", "merged")),
    *_service_default(),
)

# The paper's ablations of each RestoreLCC row, run at its head count and lr: (random heads, bias only on
# its probed heads, no directions).
ABLATIONS: dict[str, tuple[str, str]] = {
    "restorelcc": ("restorelcc-random", "bias-probe"),
    "restorelcc-default": ("restorelcc-default-random", "bias-default"),
}

FORM_LABELS = {"": "", "unmerged": "unmerged adapter", "merged": "merged, mask re-applied"}


def row_key(method: str, form: str) -> str:
    return f"{method}/{form}" if form else method


def row_label(method: Method, form: str) -> str:
    return f"{method.label}, {FORM_LABELS[form]}" if form else method.label


@dataclass(frozen=True)
class Budget:
    """Everything shared by all runs: the training budget, the data and the evaluation limits."""

    steps: int = 50
    batch_size: int = 8
    lr_offsets: float = 1e-2
    lr_adapter: float = 1e-3
    heads: float = 0.1
    probe_samples: int = 256
    train_samples: int = 2000
    max_seq_len: int = 256
    group_by_length: bool = True  # batches of similar length: ~1.7x fewer padded tokens, the same for every method
    calibration_samples: int = 128
    calibration_seq_len: int = 256
    task_limit: int = 500
    alpaca_limit: int = 300
    wikitext_limit: int | None = None  # all 1,000 sentences
    eval_batch_size: int = 8
    eval_max_seq_len: int = 512
    seeds: tuple[int, ...] = (0, 1)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seeds": list(self.seeds)}


QUICK = {"steps": 3, "batch_size": 2, "task_limit": 4, "alpaca_limit": 4, "wikitext_limit": 8, "probe_samples": 8,
         "train_samples": 32, "calibration_samples": 2, "calibration_seq_len": 32, "max_seq_len": 64,
         "eval_max_seq_len": 128}


@dataclass(frozen=True)
class Data:
    train: str
    wikitext: str
    alpaca_valid: str
    tasks: tuple[str, ...]  # boolq, piqa, openbookqa


def evaluation(data: Data, b: Budget, alpaca: str | None = None, alpaca_limit: int | None = None,
               tasks: bool = True, wikitext: bool = True) -> dict[str, Any]:
    """The evaluation section (EvaluationSpec fields); ``alpaca`` swaps in another response set (search)."""
    alpaca = alpaca or data.alpaca_valid
    limits = {Path(alpaca).stem: alpaca_limit or b.alpaca_limit}
    if tasks:
        limits.update({Path(t).stem: b.task_limit for t in data.tasks})
    if b.wikitext_limit is not None and wikitext:
        limits[Path(data.wikitext).stem] = b.wikitext_limit
    return {"perplexity": [data.wikitext] if wikitext else [], "response_perplexity": [alpaca],
            "tasks": list(data.tasks) if tasks else [], "limit": None, "limits": limits,
            "batch_size": b.eval_batch_size, "max_seq_len": b.eval_max_seq_len, "dense": False}


def pruning_spec(setting: Setting, b: Budget) -> dict[str, Any]:
    return {**setting.pruning, "calibration_samples": b.calibration_samples, "seq_len": b.calibration_seq_len}


def prune_job(setting: Setting, b: Budget, data: Data, dense_dir: str, ev: dict[str, Any] | None) -> dict[str, Any]:
    """Prune the dense model (restoration none); ``ev`` None evaluates nothing. Pruning seed is always 0."""
    return {"model": {"id": dense_dir, "dtype": "float32"}, "pruning": pruning_spec(setting, b),
            "restoration": {"method": "none"}, "data": {"calibration": data.train},
            "evaluation": ev or {"dense": False}, "seed": 0}


def restoration_spec(method: Method, b: Budget, overrides: dict[str, Any] | None = None, legacy: bool = False
                     ) -> dict[str, Any]:
    """The restoration section: only the method's own fields (``contract()``). ``legacy`` gives the flat form every
    stored fingerprint was made from (every method got heads, probe_samples and the LoRA fields), so results
    measured before the spec became per-method are still reused."""
    lr = b.lr_offsets if method.lr == "offsets" else b.lr_adapter
    # objective sft without an EOS after each response: the comparison and the search measured the paper's recipe
    # (bench objective varies the objective, bench stop the EOS)
    r = {**method.restoration, "objective": "sft", "response_eos": False, "heads": b.heads,
         "probe_samples": b.probe_samples, "train_samples": b.train_samples,
         "max_steps": b.steps, "batch_size": b.batch_size, "lr": lr, "max_seq_len": b.max_seq_len,
         "group_by_length": b.group_by_length, "lora_r": 8, "lora_alpha": 16, "lora_targets": ["q_proj", "v_proj"]}
    if r["method"] == "restorelcc":
        r["directions"] = None  # all of them, as in the paper, unless the row or a search point says otherwise
    r.update(dict(method.fixed))
    r.update(overrides or {})
    return r if legacy else {k: v for k, v in r.items() if k in contract()["fields"][r["method"]]}


def restore_job(method: Method, b: Budget, data: Data, pruned_dir: str, dense_dir: str, seed: int,
                overrides: dict[str, Any] | None = None, legacy: bool = False) -> dict[str, Any]:
    """Restore the cached pruned model (pruning 'none'); evaluation is done outside the pipeline.

    ``model.dense`` is given to every method, not only those that need dense activations: the pipeline
    starts a restoration's state while the dense model is loaded, so without it a LoRA, DoRA or bias
    (random/all heads) run on an already-pruned model finds no state. Nothing dense is evaluated."""
    return {"model": {"id": pruned_dir, "dtype": "float32", "dense": dense_dir}, "pruning": {"method": "none"},
            "restoration": restoration_spec(method, b, overrides, legacy), "data": {"train": data.train},
            "evaluation": {"dense": False}, "output": {"format": "adapter" if method.forms != ("",) else "merged"},
            "seed": seed}


def pruned_fingerprint(setting: Setting, b: Budget, data: Data, ev: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint of a setting's pruned-model result (its metrics under ``ev``)."""
    return fingerprint(prune_job(setting, b, data, "", ev), ev)


def restore_fingerprint(setting: Setting, method: Method, b: Budget, data: Data, seed: int, ev: dict[str, Any],
                        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fingerprint of one restoration run (model paths play no part), from the legacy flat spec."""
    job = restore_job(method, b, data, "", "", seed, overrides, legacy=True)
    return fingerprint(job, ev, pruning_spec(setting, b))


def expected_fingerprint(b: Budget, data: Data, setting_key: str, method_key: str, seed: int
                         ) -> dict[str, Any] | None:
    """The fingerprint a run of today's plan would store for (setting, method, seed); None when the plan
    has no such setting or method."""
    setting = next((s for s in SETTINGS if s.key == setting_key), None)
    if setting is None:
        return None
    ev = evaluation(data, b)
    if method_key == "pruned":
        return pruned_fingerprint(setting, b, data, ev)
    method = next((m for m in METHODS if m.key == method_key), None)
    return None if method is None else restore_fingerprint(setting, method, b, data, seed, ev)


def fingerprint(job: dict[str, Any], ev: dict[str, Any] | None, pruned_by: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """What a stored result must match to be reused: the job without model paths, the evaluation, and how
    the restored model was pruned (for jobs that start from the cached pruned model)."""
    job = {k: v for k, v in job.items() if k != "model"}
    r = job.get("restoration")
    if isinstance(r, dict) and "directions" in r and r["directions"] is None:
        # All directions is what every run got before the setting existed: results stored then still match.
        job["restoration"] = {k: v for k, v in r.items() if k != "directions"}
    return {"job": job, "evaluation": ev, "pruned_by": pruned_by}


@dataclass(frozen=True)
class Selection:
    """``--only`` patterns: SETTING, SETTING/METHOD, with shell wildcards (``*/lora``, ``wanda-50/bias-*``)."""

    patterns: tuple[str, ...] = field(default_factory=tuple)

    def wants(self, setting: str, method: str | None = None) -> bool:
        for p in self.patterns or ("*",):
            s, _, m = p.partition("/")
            if fnmatch.fnmatchcase(setting, s) and (method is None or not m or fnmatch.fnmatchcase(method, m)):
                return True
        return False


def parse_only(values: list[str] | None) -> Selection:
    out = [p.strip() for v in values or [] for p in v.split(",") if p.strip()]
    known_s, known_m = {s.key for s in SETTINGS}, {m.key for m in METHODS} | {"pruned"}
    for p in out:
        s, _, m = p.partition("/")
        if not any(fnmatch.fnmatchcase(k, s) for k in known_s):
            raise ValueError(f"--only {p}: no setting matches {s!r} (settings: {', '.join(sorted(known_s))})")
        if m and not any(fnmatch.fnmatchcase(k, m) for k in known_m):
            raise ValueError(f"--only {p}: no method matches {m!r} (methods: {', '.join(sorted(known_m))})")
    return Selection(tuple(out))


def seeds_for(method: Method, b: Budget) -> tuple[int, ...]:
    """Main rows run every seed; the others the first seed only."""
    return b.seeds if method.main else b.seeds[:1]


def plan(b: Budget, only: Selection) -> list[tuple[Setting, Method, int]]:
    return [(s, m, seed) for s in SETTINGS for m in METHODS for seed in seeds_for(m, b) if only.wants(s.key, m.key)]


def method_by_key(key: str) -> Method:
    return next(m for m in METHODS if m.key == key)


def setting_by_key(key: str) -> Setting:
    return next(s for s in SETTINGS if s.key == key)
