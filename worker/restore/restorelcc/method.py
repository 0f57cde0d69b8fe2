"""RestoreLCC as the runner drives it: dense captures while the dense model is loaded, pruned captures, the lost
directions (one batched SVD) and contrastive head scores, then offsets β·directions + b on the chosen heads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.methods import HeadConfig
from app.schemas import JobSpec
from worker.errors import DataError, SpecError
from worker.model.arch import ArchInfo, DecoderAdapter
from worker.model.data import read_instructions
from worker.restore.method import Job, Preflight, Progress, batch_progress
from worker.restore.offsets.heads import HeadOffsets
from worker.restore.offsets.method import OffsetMethod
from worker.restore.restorelcc.pairs import choose_negatives
from worker.restore.restorelcc.steps import (
    build_probe_inputs,
    capture_dense,
    capture_pruned,
    extract_components,
    make_offsets,
    score_heads,
)

MIN_PROBE_ROWS = 4


class RestoreLCC(OffsetMethod):
    def __init__(self, config: HeadConfig, seed: int):
        super().__init__(config, seed)
        self.probe_inputs: Any = None
        self.dense: Any = None  # DenseCaptures
        self.pruned: Any = None  # (N, L, H, d) at the prompts' last tokens
        self.components: Any = None  # LostComponents

    def preflight(self, pre: Preflight) -> None:
        super().preflight(pre)
        top = getattr(self.config, "directions", None)
        if top is not None and top >= 1 and top > pre.info.head_dim:
            raise SpecError(f"restoration.directions {top:g} exceeds the model's head_dim {pre.info.head_dim}",
                            field="restoration.directions")
        rows = pre.train_rows
        if self.config.head_selection == "probe" and rows is not None and rows < MIN_PROBE_ROWS:
            raise DataError(f"data.train: {rows} rows; contrastive probing needs at least {MIN_PROBE_ROWS}",
                            field="data.train")

    def prepare(self, spec: JobSpec, model: Any, tokenizer: Any, adapter: DecoderAdapter, progress: Progress) -> None:
        """Probe inputs (with contrastive negatives when probing) and the dense model's head outputs on them."""
        r = self.config
        assert spec.data.train is not None
        pairs = read_instructions(spec.data.train, limit=r.probe_samples)
        negatives, backend = None, None
        if r.head_selection == "probe":
            progress(0.0, f"choosing contrastive negatives for {len(pairs)} probe pairs")
            negatives, backend = choose_negatives([resp for _, resp in pairs], r.negatives)
        self.probe_inputs = build_probe_inputs(tokenizer, pairs, r.max_seq_len, r.batch_size, negatives)
        kept, dropped = self.probe_inputs.n, self.probe_inputs.dropped
        if negatives is not None and kept < MIN_PROBE_ROWS:
            raise DataError(f"data.train: {kept} of the {len(pairs)} probe pairs differ from their contrastive "
                            f"negative within restoration.max_seq_len {r.max_seq_len} tokens; contrastive probing "
                            f"needs at least {MIN_PROBE_ROWS} (the others' prompts fill the window, or their "
                            "responses agree with the negative's as far as they fit)", field="data.train")
        self.dense = capture_dense(model, adapter, self.probe_inputs, batch_progress(progress, 0.1, 1.0, "dense"))
        self.report.update(probe_samples=len(pairs), probe_pairs_dropped=dropped, negatives_backend=backend)

    def probe(self, job: Job, progress: Progress) -> None:
        self.pruned = capture_pruned(job.model, job.adapter, self.probe_inputs,
                                     batch_progress(progress, 0.0, 1.0, "pruned"))

    def select(self, job: Job, progress: Progress, checkpoint: Callable[[], None]) -> None:
        """Lost directions, contrastive head scores (when probing) and the chosen heads."""
        progress(0.0, "extracting lost directions")
        self.components = extract_components(self.dense, self.pruned)
        checkpoint()
        scores = tiebreak = None
        if self.config.head_selection == "probe":
            progress(0.3, "probing heads")
            result = score_heads(self.dense, self.pruned, self.components, seed=self.seed)
            scores, tiebreak = result.accuracy, result.val_loss
        self.choose(job.adapter.info, scores, tiebreak)
        self.dense = self.pruned = self.probe_inputs = None  # no longer needed

    def make_offsets(self, info: ArchInfo) -> HeadOffsets:
        offsets = make_offsets(self.heads, info, self.components, seed=self.seed, directions=self.config.directions)
        self.components = None
        return offsets
