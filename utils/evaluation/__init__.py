"""Evaluation: InsightFace `.bin` verification, scoring a dataset with a model, IJB and the evaluation
commands' shared parts, the pipeline's results table and plots.

Modules are imported by their full path (`from utils.evaluation.<module> import ...`): importing the package
imports nothing else."""
