"""Cleaning rules: the registry, the rules and the probabilities they read, the quality of a cleaning
against known noise, the mislabeled / outlier lists and the contact sheet.

Modules are imported by their full path (`from utils.cleaning.<module> import ...`): importing the package
imports nothing else."""
