"""The synthetic stand-in for a face dataset (make_synthetic_dataset.py); no stage needs it.

Modules are imported by their full path (`from utils.synthetic.<module> import ...`): importing the package
imports nothing else."""
