"""The harness around the method: run files and their identity, checkpoints, evaluation, stored embeddings, outputs,
the demo data, the studies' stages."""
