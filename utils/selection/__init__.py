"""Selection (pruning) methods: the registry, DiffProb, keep-k per identity, random, CCS, and the ranking
written beside every kept list.

Modules are imported by their full path (`from utils.selection.<module> import ...`): importing the package
imports nothing else."""
