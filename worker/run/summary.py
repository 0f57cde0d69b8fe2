"""A before/after table of a report's metrics, for terminals."""

from __future__ import annotations

from typing import Any

_COLUMNS = ("dense", "pruned", "restored")


def metric_rows(metrics: dict[str, dict[str, Any]]) -> list[tuple[str, list[float | None]]]:
    """[(label, [dense, pruned, restored])] for every metric any of the models has."""
    labels: dict[str, None] = {}
    for col in _COLUMNS:
        for set_name, values in (metrics.get(col) or {}).items():
            if isinstance(values, dict):
                for key in values:
                    if key in ("ppl", "response_ppl", "acc", "acc_norm"):
                        labels[f"{set_name}.{key}"] = None
            elif isinstance(values, int | float):
                labels[set_name] = None
    rows = []
    for label in labels:
        vals: list[float | None] = []
        for col in _COLUMNS:
            node: Any = metrics.get(col) or {}
            for part in label.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            vals.append(float(node) if isinstance(node, int | float) else None)
        rows.append((label, vals))
    return rows


def format_summary(report: dict[str, Any]) -> str:
    lines = []
    sparsity = (report.get("sparsity") or {}).get("overall")
    if sparsity is not None:
        lines.append(f"sparsity of the pruned linears: {100 * sparsity:.2f}%")
    restoration = report.get("restoration") or {}
    if restoration.get("trainable_params") is not None:
        lines.append(
            f"restoration: {restoration.get('method')} · {restoration.get('trainable_params'):,} trainable "
            f"parameters · {len(restoration.get('chosen_heads') or [])} heads"
        )
    rows = metric_rows(report.get("metrics") or {})
    if rows:
        width = max(len(r[0]) for r in rows)
        lines.append("")
        lines.append(f"{'metric':<{width}}  " + "  ".join(f"{c:>10}" for c in _COLUMNS))
        for label, vals in rows:
            cells = "  ".join(f"{v:>10.4g}" if v is not None else f"{'—':>10}" for v in vals)
            lines.append(f"{label:<{width}}  {cells}")
    return "\n".join(lines)
