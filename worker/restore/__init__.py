"""RestoreLCC: capture per-head outputs, extract lost components, probe heads, learn offsets, merge.

See :mod:`worker.restore.restorelcc` for the order the pipeline calls things in.
"""

from worker.restore.capture import ProbeInputs, build_probe_inputs, capture_head_outputs
from worker.restore.extract import LostComponents, lost_activations, lost_components, summary_component
from worker.restore.heads import HeadOffsets, inject
from worker.restore.merge import (
    check_mergeable,
    load_restoration,
    merge_into_o_proj,
    restoration_info,
    save_restoration,
)
from worker.restore.pairs import choose_negatives
from worker.restore.probe import ProbeResult, probe_features, rank_heads, select_heads, train_probes
from worker.restore.train import train_offsets

__all__ = [
    "HeadOffsets",
    "LostComponents",
    "ProbeInputs",
    "ProbeResult",
    "build_probe_inputs",
    "capture_head_outputs",
    "check_mergeable",
    "choose_negatives",
    "inject",
    "load_restoration",
    "lost_activations",
    "lost_components",
    "merge_into_o_proj",
    "probe_features",
    "rank_heads",
    "restoration_info",
    "save_restoration",
    "select_heads",
    "summary_component",
    "train_offsets",
    "train_probes",
]
