"""End-to-end pipelines: understanding (image + text -> text) and decoding (embeddings -> images)."""
