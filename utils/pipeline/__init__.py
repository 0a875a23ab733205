"""run_pipeline.py's machinery: its profiles (`profiles.py`), its steps (`steps.py`: order, completeness, ETA,
results) and how a stage script runs (`runner.py`: forked on CPU, a subprocess on GPUs); run_pipeline.py is the
command line.

Modules are imported by their full path (`from utils.pipeline.<module> import ...`): importing the package
imports nothing else."""
