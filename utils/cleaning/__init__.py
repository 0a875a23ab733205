"""Cleaning rules: the registry (`registry.py`), what the rules decide (`rules.py`), the probabilities they read
(`probabilities.py`), the mislabeled / outlier lists (`lists.py`), the quality of a cleaning against known noise
(`quality.py`) and the contact sheet (`contact_sheet.py`).

Modules are imported by their full path (`from utils.cleaning.<module> import ...`): importing the package
imports nothing else."""
