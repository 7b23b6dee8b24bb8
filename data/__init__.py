"""The data below dataloader.py's front: the readers and their base (splits.py), the other forms (forms.py),
several roots (mixing.py), loader worker processes (workers.py)."""
