"""The process a stage runs in: `run_stage` (exit codes, one-line errors, locks) and its context (device,
autocast, torch.distributed, logging, seeds).

Modules are imported by their full path (`from utils.runtime.<module> import ...`): importing the package
imports nothing else."""
