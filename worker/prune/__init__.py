"""Pruning: masks (pure maths), magnitude, Wanda and SparseGPT, the layer-by-layer runner, measurement."""
