"""Files between stages: atomic writes beside manifests, every path a stage reads or writes, the readers of
per-sample records, kept-set files, and the lock that gives one run an output folder.

Modules are imported by their full path (`from utils.artifacts.<module> import ...`): importing the package
imports nothing else."""
