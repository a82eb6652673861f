"""PyTorch reference modules written from the specifications, for parity tests."""
