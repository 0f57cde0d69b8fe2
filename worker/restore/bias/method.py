"""A learned constant per chosen head, without RestoreLCC's directions (the paper's ablation). Heads are probed
as RestoreLCC probes them, or chosen at random or all — then nothing is captured and no probing stage runs."""

from __future__ import annotations

from typing import Any

from app.schemas import JobSpec
from worker.model.arch import ArchInfo, DecoderAdapter
from worker.restore.method import Progress
from worker.restore.offsets.heads import HeadOffsets
from worker.restore.restorelcc.method import RestoreLCC
from worker.restore.restorelcc.steps import make_offsets


class Bias(RestoreLCC):
    def prepare(self, spec: JobSpec, model: Any, tokenizer: Any, adapter: DecoderAdapter, progress: Progress) -> None:
        if self.config.needs_activations():
            super().prepare(spec, model, tokenizer, adapter, progress)
        else:  # random or all heads: known now
            self.choose(adapter.info)

    def make_offsets(self, info: ArchInfo) -> HeadOffsets:
        self.components = None
        return make_offsets(self.heads, info, None, seed=self.seed)
