"""Use: a trained run outside featcache. ``export`` (TorchScript, the GUIEC zip, ONNX), ``index``
(a collection as a faiss index, searched by image), ``embeddings`` (the LAION ecosystem's layout, out
and back in); ``embedder`` rebuilds image -> backbone -> head -> L2 exactly as the cache recorded it."""
