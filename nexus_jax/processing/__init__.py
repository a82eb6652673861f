"""Host-side preprocessing: image processor, M-RoPE position ids, chat templates."""
