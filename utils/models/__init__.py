"""Models: building a backbone + margin head from the config or a checkpoint, checkpoints, and the one way an
image batch becomes embeddings.

Modules are imported by their full path (`from utils.models.<module> import ...`): importing the package
imports nothing else."""
