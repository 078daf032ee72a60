"""Importers from HF-layout PyTorch checkpoints (local folders only) into hade_jax modules."""
