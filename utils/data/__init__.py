"""Datasets on disk: MXNet RecordIO, the training datasets read from it, writing and exporting a dataset folder,
label-noise injection (the one `noise.json` module), image transforms, face alignment and redundancy.

Modules are imported by their full path (`from utils.data.<module> import ...`): importing the package
imports nothing else."""
