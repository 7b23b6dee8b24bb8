"""Few-shot models."""
