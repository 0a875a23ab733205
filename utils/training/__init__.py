"""Training a backbone + margin head: the loop (`loop.py`), what each epoch saves and resuming from it (`resume.py`),
what it records per sample (`recording.py`), the optimizer and its schedule (`optimizer.py`).

Modules are imported by their full path (`from utils.training.<module> import ...`): importing the package
imports nothing else."""
