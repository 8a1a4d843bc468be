"""Instance-level relation modules: graphs over the embeddings of a whole batch (training only)."""
