"""Training datasets: a RecordIO folder (InsightFace layout or plain keys) or an image-folder tree.

Items are `(image uint8 (3, H, W) RGB, label, sample_index)`. Flip and scaling to [-1, 1] are done
on the whole batch on the training device (`utils.data.transforms`), so workers only decode JPEGs.
A kept-index list selects samples; a label map renumbers the identities that survive.

An image that cannot be decoded raises `BadImageError` naming the file, the record key and the sample
index. With `skip_bad_images` the dataset yields a `BadSample` marker instead, and `collate_skip_bad`
(the DataLoader's collate_fn then) drops it from the batch with one warning per sample; scoring's
`collate_bad_apart` drops it too and returns the indices of the dropped samples, which get no score.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from utils.artifacts.files import ArtifactError, Fingerprint, label_map_array
from utils.data.recordio import MXIndexedRecordIO, RecordIOError, read_layout, unpack_img

log = logging.getLogger("diffprob")

cv2.setNumThreads(1)  # one decoder thread per worker; the workers are the parallelism

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_SKIP_HINT = "rerun with --skip_bad_images true to train without it, or replace the file"


class BadImageError(ArtifactError):
    """A sample whose image cannot be decoded: `where` (file, record key) and `sample_index` say which."""

    def __init__(self, where: str, sample_index: int = None, problem: str = "is not an image OpenCV can decode"):
        self.where, self.sample_index = where, sample_index
        if sample_index is not None:
            message = f"{where} (sample {sample_index}) {problem}; {_SKIP_HINT}"
        else:  # rebuilt from its message (unpickled, or re-raised by a DataLoader worker)
            message = where
            # A worker re-raises it in the main process as type(e)("Caught ... Original Traceback ...
            # \nutils.data.datasets.BadImageError: <message>"): keep the one line that says what is wrong.
            if message.startswith("Caught ") and "Traceback" in message:
                message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class BadSample(NamedTuple):
    """What a dataset with `skip_bad_images` yields in place of an undecodable sample."""
    sample_index: int
    where: str  # file and record key, for the warning


class FaceDataset(Dataset):
    """Common part: per-sample labels, the kept selection, the label map, the fingerprint."""

    skip_bad_images = False  # yield a BadSample marker (for collate_skip_bad) instead of raising BadImageError

    def __init__(self, labels: np.ndarray, num_classes: int, fingerprint: Fingerprint,
                 kept_index=None, label_map: dict = None):
        self.all_labels = np.asarray(labels, dtype=np.int64)
        self.num_images = len(self.all_labels)
        self.source_num_classes = int(num_classes)
        self.fingerprint = fingerprint
        if kept_index is None:
            self.sample_index = np.arange(self.num_images, dtype=np.int64)
        else:
            self.sample_index = np.asarray(kept_index, dtype=np.int64)
            if self.sample_index.size == 0:
                raise ArtifactError("the kept list is empty; nothing to train on")
            if self.sample_index.min() < 0 or self.sample_index.max() >= self.num_images:
                raise ArtifactError(f"kept list indices outside [0, {self.num_images})")
        labels = self.all_labels[self.sample_index]
        if label_map is not None:
            table = label_map_array(label_map, self.source_num_classes)
            labels = table[labels]
            if (labels < 0).any():
                bad = self.sample_index[labels < 0][:5].tolist()
                raise ArtifactError(f"kept samples {bad} have identities that the label map drops")
            self.num_classes = len(label_map)
        else:
            self.num_classes = self.source_num_classes
        self.labels = labels

    def __len__(self):
        return len(self.sample_index)

    def select(self, kept_index=None, label_map=None) -> "FaceDataset":
        """The same images restricted to a kept list and renumbered by a label map (no re-listing)."""
        new = copy.copy(self)
        FaceDataset.__init__(new, self.all_labels, self.source_num_classes, self.fingerprint, kept_index, label_map)
        return new

    def with_labels(self, sample_index, new_labels) -> "FaceDataset":
        """Every image, with the samples `sample_index` given `new_labels` (relabel instead of remove)."""
        labels = self.all_labels.copy()
        labels[np.asarray(sample_index, dtype=np.int64)] = np.asarray(new_labels, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= self.source_num_classes):
            raise ArtifactError(f"suggested labels must be in [0, {self.source_num_classes})")
        new = copy.copy(self)
        FaceDataset.__init__(new, labels, self.source_num_classes, self.fingerprint)
        return new

    def load_image(self, sample_index: int) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, i):
        # Indices >= len(self) are the padding duplicates of PaddedDistributedSampler: the image is
        # real (so every rank runs the same number of steps) but it reports sample index -1.
        pad = i >= len(self)
        i = i % len(self)
        sample = int(self.sample_index[i])
        try:
            img = self.load_image(sample)
        except BadImageError as e:
            if not self.skip_bad_images:
                raise
            return BadSample(sample, e.where)
        tensor = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        return tensor, int(self.labels[i]), -1 if pad else sample


class RecordDataset(FaceDataset):
    """Images of an MXNet indexed RecordIO folder (train.rec, train.idx, property).

    A set whose decoded images fit in `cache_bytes` (the synthetic demo: 14 MB; not CASIA-WebFace's 18 GB) keeps
    each image once decoded, in the process that decoded it: every epoch after the first reads no record.
    """

    cache_bytes = 256 << 20

    def __init__(self, rec_dir, kept_index=None, label_map=None, layout=None, skip_bad_images=False):
        self.rec_dir = Path(rec_dir)
        if not self.rec_dir.is_dir():
            raise ArtifactError(f"dataset folder {self.rec_dir} not found: pass --rec DIR (an InsightFace RecordIO "
                                f"folder), or make a synthetic one: python make_synthetic_dataset.py --out {self.rec_dir}")
        for name in ("train.rec", "train.idx"):
            if not (self.rec_dir / name).exists():
                hint = f" (rebuild it from train.rec: python -m utils.data.recordio rebuild-index {self.rec_dir})" \
                    if name == "train.idx" else ""
                raise ArtifactError(f"{self.rec_dir / name} not found{hint}")
        self.layout = layout if layout is not None else read_layout(self.rec_dir)
        fp = dataset_fingerprint(self.rec_dir, self.layout)
        super().__init__(self.layout.labels, self.layout.num_classes, fp, kept_index, label_map)
        self.image_keys = np.asarray(self.layout.image_keys, dtype=np.int64)
        self.skip_bad_images = skip_bad_images
        self._reader = None
        self._pid = None
        self._cache = None  # sample index -> decoded image, once the first image shows the set fits
        self._cache_decided = False
        self._size = None  # (height, width) every image must have: set by the first image checked

    def _open(self):
        if self._reader is None or self._pid != os.getpid():  # one file handle per worker process
            self._reader = MXIndexedRecordIO(str(self.rec_dir / "train.idx"), str(self.rec_dir / "train.rec"), "r")
            self._pid = os.getpid()
        return self._reader

    def load_image(self, sample_index):
        if self._cache is not None and sample_index in self._cache:
            return self._cache[sample_index]
        key = int(self.image_keys[sample_index])
        record = self._open().read_idx(key)  # a damaged index or file is not one bad sample: it raises as is
        try:
            _, img = unpack_img(record)
        except RecordIOError as e:
            raise BadImageError(f"{self.rec_dir / 'train.rec'}: record key {key}", sample_index) from e
        self._check_size(img, key, sample_index)
        if not self._cache_decided:
            self._cache_decided = True
            if img.nbytes * self.num_images <= self.cache_bytes:
                self._cache = {}
        if self._cache is not None:
            img.setflags(write=False)  # shared by every later read
            self._cache[sample_index] = img
        return img

    def _check_size(self, img, key: int, sample_index: int):
        """Every image of a batch must have one size: the `property` file's, else the first image read's."""
        if self._size is None:
            self._size = tuple(self.layout.image_size) if self.layout.image_size else img.shape[:2]
        if img.ndim != 3 or img.shape[2] != 3 or img.shape[:2] != self._size:
            found = "x".join(map(str, img.shape))
            said = "its property file says" if self.layout.image_size else "the first image read is"
            raise BadImageError(f"{self.rec_dir / 'train.rec'}: record key {key}", sample_index,
                                f"is a {found} image where {said} {self._size[0]}x{self._size[1]}x3 (if every "
                                f"image says so, the property file is wrong)")

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_reader=None, _cache=None, _cache_decided=False)  # a worker process decodes for itself
        return state


class ImageFolderDataset(FaceDataset):
    """root/<identity>/<image>: identities in sorted folder order get labels 0..K-1."""

    def __init__(self, root, kept_index=None, label_map=None, skip_bad_images=False):
        self.root = Path(root)
        self.skip_bad_images = skip_bad_images
        if not self.root.is_dir():
            raise ArtifactError(f"image folder {self.root} not found")
        identities = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        files, labels = [], []
        for label, ident in enumerate(identities):
            names = sorted(f for f in os.listdir(self.root / ident) if f.lower().endswith(IMAGE_EXTENSIONS))
            files += [f"{ident}/{n}" for n in names]
            labels += [label] * len(names)
        if not files:
            raise ArtifactError(f"{self.root / 'train.rec'} not found, and {self.root} has no images in identity "
                                f"sub-folders: --rec names an InsightFace RecordIO folder (train.rec, train.idx, "
                                f"property) or a folder of identity sub-folders of images")
        self.files = files
        listing = "\n".join(files).encode()
        fp = Fingerprint(len(files), len(identities), len(listing))
        super().__init__(np.array(labels), len(identities), fp, kept_index, label_map)

    def load_image(self, sample_index):
        path = self.root / self.files[sample_index]
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise BadImageError(str(path), sample_index)
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def dataset_fingerprint(rec_dir, layout=None) -> Fingerprint:
    """The fingerprint of a dataset folder: (images, classes, size of train.idx) of a RecordIO folder, or
    (images, identities, size of the file listing) of an image folder."""
    if layout is None and not (Path(rec_dir) / "train.rec").exists() and Path(rec_dir).is_dir():
        return ImageFolderDataset(rec_dir).fingerprint
    layout = layout if layout is not None else read_layout(rec_dir)
    return layout.fingerprint


def open_dataset(rec, kept_index=None, label_map=None, skip_bad_images=False) -> FaceDataset:
    """RecordIO folder when it has train.rec, else an image-folder tree."""
    rec = Path(rec)
    if (rec / "train.rec").exists() or not rec.is_dir():
        return RecordDataset(rec, kept_index, label_map, skip_bad_images=skip_bad_images)
    return ImageFolderDataset(rec, kept_index, label_map, skip_bad_images=skip_bad_images)


_BAD_SEEN = set()  # sample indices this process has dropped (each warned about once)


def collate_skip_bad(items):
    """DataLoader collate_fn for `skip_bad_images`: drops BadSample markers, collates the rest.

    Returns the usual (images uint8 (B, 3, H, W), labels (B,), sample_index (B,)) with B the good samples
    of the batch: the shortfall from batch_size is the number skipped. A batch of only bad samples gives
    B = 0 (images of shape (0, 3, 0, 0)).
    """
    for bad in items:
        if isinstance(bad, BadSample) and bad.sample_index not in _BAD_SEEN:
            _BAD_SEEN.add(bad.sample_index)
            log.warning("skipping %s (sample %d): not an image OpenCV can decode (skip_bad_images)",
                        bad.where, bad.sample_index)
    return _collate_good(items)


def collate_bad_apart(items):
    """DataLoader collate_fn for scoring with `skip_bad_images`: `collate_skip_bad`'s three tensors (no warning
    per sample: the scoring stage reports them all in one line), then the sample indices (m,) of the batch's bad
    samples, so that the process that reads the loader learns which ones had no image."""
    bad = [x.sample_index for x in items if isinstance(x, BadSample)]
    return (*_collate_good(items), torch.tensor(bad, dtype=torch.int64))


def _collate_good(items) -> tuple:
    """The samples of `items` that are not BadSample markers, collated (an empty batch of shape (0, 3, 0, 0)
    when there is none)."""
    good = [x for x in items if not isinstance(x, BadSample)]
    if not good:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8), torch.empty(0, dtype=torch.int64), \
            torch.empty(0, dtype=torch.int64)
    return tuple(default_collate(good))


def bad_samples() -> list:
    """Sorted sample indices of the bad images `collate_skip_bad` has dropped in this process (with DataLoader
    workers, each worker keeps and logs its own; the main process sees the shorter batches)."""
    return sorted(_BAD_SEEN)


class PaddedDistributedSampler(Sampler):
    """Shuffled shards of equal length; padding duplicates are returned as `index + len(dataset)`.

    Like DistributedSampler it pads so that every rank runs the same number of steps, but the
    dataset can tell a padding duplicate from a real sample (it reports sample index -1), so
    per-sample records never count a sample twice.
    """

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0):
        self.n, self.rank, self.world_size, self.shuffle, self.seed = dataset_len, rank, world_size, shuffle, seed
        self.epoch = 0
        self.subset = None
        self.per_rank = math.ceil(self.n / world_size)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def set_subset(self, subset):
        """Iterate over these sample indices only (dynamic pruning's epoch; sorted int64), or every sample (None).
        The same shuffle and padding, over the subset: the epoch's length follows it."""
        self.subset = None if subset is None else np.asarray(subset, dtype=np.int64)
        size = self.n if self.subset is None else self.subset.size
        self.per_rank = math.ceil(size / self.world_size)

    def order(self) -> np.ndarray:
        size = self.n if self.subset is None else self.subset.size
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(size, generator=g).numpy()
        else:
            order = np.arange(size)
        if self.subset is not None:
            order = self.subset[order]
        total = self.per_rank * self.world_size
        if total > size:
            order = np.concatenate([order, order[: total - size] + self.n])
        return order

    def __iter__(self):
        return iter(self.order()[self.rank::self.world_size].tolist())

    def __len__(self):
        return self.per_rank
