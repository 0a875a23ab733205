"""`Flags`, what every cleaning rule returns (utils/cleaning/registry.py): the flagged samples, each one's suggested
label and confidence, and which are outliers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Flags:
    index: np.ndarray  # sorted unique int64 sample indices the rule flags
    suggested_label: Optional[np.ndarray] = None  # per flagged sample, the label the rule believes in (-1: none)
    confidence: Optional[np.ndarray] = None  # per flagged sample: p(suggested label), or for an outlier its
    #                                          largest class probability (low: no identity claims it)
    info: dict = field(default_factory=dict)
    outlier: Optional[np.ndarray] = None  # per flagged sample, True where no identity is suggested

    def __post_init__(self):
        if self.outlier is None:
            self.outlier = np.zeros(self.index.size, dtype=bool)

    def subset(self, keep: np.ndarray) -> "Flags":
        """The flags of the sample indices `keep` (a subset of `index`)."""
        pos = np.searchsorted(self.index, keep)
        pick = lambda a: None if a is None else a[pos]  # noqa: E731
        return Flags(self.index[pos], pick(self.suggested_label), pick(self.confidence), dict(self.info),
                     self.outlier[pos])
