"""Training a backbone + margin head: the loop, resume, and what it records per sample.

Modules are imported by their full path (`from utils.training.<module> import ...`): importing the package
imports nothing else."""
