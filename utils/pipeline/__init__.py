"""run_pipeline.py's machinery: how a stage script is run (forked or as a subprocess).

Modules are imported by their full path (`from utils.pipeline.<module> import ...`): importing the package
imports nothing else."""
