"""Per-sample scores from training records: DynUnc, EL2N, AUM, forgetting, uncertainty, and trajectory soft
labels with their compiled kernel.

Modules are imported by their full path (`from utils.dynamics.<module> import ...`): importing the package
imports nothing else."""
