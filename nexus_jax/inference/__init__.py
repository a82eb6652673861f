"""Batch inference: requests JSONL -> PNGs and a results JSONL (``nexus-jax infer``)."""
