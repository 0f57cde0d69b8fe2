"""Restoration methods: one folder each (restorelcc/, bias/, adapters/), the per-head offsets RestoreLCC and bias
share (offsets/), the shared training loop (train.py, batches.py), the method lifecycle the runner drives
(method.py) and the registry that maps a spec's ``restoration.method`` to its implementation (registry.py)."""
