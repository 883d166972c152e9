"""Prefilter: cheap retrieval that narrows the corpus to each query's top-M candidates.

TF-IDF and BM25 over hashed term counts (:mod:`.sparse`), or sentence embeddings in FAISS
(:mod:`.dense`), stored as described in :mod:`.manifest`; :mod:`.index` builds, extends and
opens indexes, :mod:`.candidates` feeds them to influence scoring.
"""
