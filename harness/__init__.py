"""The harness around the method: run files, evaluation, stored embeddings, other data forms, the console."""
