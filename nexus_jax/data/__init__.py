"""Input data: Nexus-Gen JSONL records, an array_record TFDS builder, Grain pipelines with fixed-shape batches."""
