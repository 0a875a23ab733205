"""IJB-B / IJB-C meta files of the official release: reading and checking them (`load_ijb_meta`).

Layout under `root` (`t` = 'ijbc' or 'ijbb'):

    loose_crop/*.jpg                   the images
    meta/t_face_tid_mid.txt            "image template_id media_id"
    meta/t_name_5pts_score.txt         "image x1 y1 ... x5 y5 detector_score", same images, same order
    meta/t_template_pair_label.txt     "template_a template_b label" (1 = same subject)
    meta/t_1N_gallery_G1.csv, ..._G2.csv, t_1N_probe_mixed.csv    optional, for 1:N (IJB-B: S1, S2)
"""
import csv
import itertools
import logging
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from utils.errors import InputError, ToolkitError

logger = logging.getLogger("utils.evaluation.ijb")

TARGETS = ("ijbb", "ijbc")
FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIR_TARGETS = (0.01, 0.1)
RANKS = (1, 5, 10)
# IJB-C calls its two galleries G1/G2, IJB-B S1/S2; the first name that exists is used.
GALLERY_FILES = {"G1": ("{t}_1N_gallery_G1.csv", "{t}_1N_gallery_S1.csv"),
                 "G2": ("{t}_1N_gallery_G2.csv", "{t}_1N_gallery_S2.csv")}
PROBE_FILE = "{t}_1N_probe_mixed.csv"
CSV_COLUMNS = ("TEMPLATE_ID", "SUBJECT_ID", "FILENAME")


class IJBMetaError(ToolkitError, ValueError):
    """A meta file that does not describe a usable IJB evaluation; the message names file and line."""


_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True  # the bytes that bytes.split() splits on


def _read_fields(path, num_fields, expected):
    """The non-blank lines of a whitespace-separated text file, each of exactly `num_fields` fields.

    -> (fields (M, num_fields) object array of bytes, line number (M,) of each row). Fields are counted
    per line on the raw bytes with NumPy: a Python loop over IJB-C's 469k lines takes seconds.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise IJBMetaError(f"{path}: no data lines ({expected} expected)")
    buf = np.frombuffer(raw, dtype=np.uint8)
    space = _WHITESPACE[buf]
    token_starts = np.flatnonzero(~space & np.r_[True, space[:-1]])
    newlines = np.flatnonzero(buf == 10)
    counts = np.bincount(np.searchsorted(newlines, token_starts), minlength=newlines.size + 1)
    bad = np.flatnonzero((counts > 0) & (counts != num_fields))
    if bad.size:
        line = raw.split(b"\n")[bad[0]].decode("utf-8", "replace").rstrip("\r")
        raise IJBMetaError(f"{path}, line {bad[0] + 1}: expected {num_fields} fields ({expected}), "
                           f"found {counts[bad[0]]}: {line!r}")
    fields = np.empty(token_starts.size, dtype=object)
    fields[:] = raw.split()
    return fields.reshape(-1, num_fields), np.flatnonzero(counts) + 1


def _to_numbers(path, fields, lines, dtype, expected):
    """`fields` (M, k) of bytes as a `dtype` array; the first bad value is reported with its line."""
    integer = np.issubdtype(np.dtype(dtype), np.integer)
    try:
        values = fields.astype(dtype)
        if integer or np.isfinite(values).all():
            return values
    except (ValueError, TypeError, OverflowError):
        pass
    for row, lineno in zip(fields, lines):
        for value in row:
            try:
                ok = np.isfinite(int(value) if integer else float(value))
            except (ValueError, OverflowError):
                ok = False
            if not ok:
                kind = "an integer" if integer else "a finite number"
                raise IJBMetaError(f"{path}, line {lineno}: {value.decode('utf-8', 'replace')!r} is not {kind} "
                                   f"({expected})")
    raise IJBMetaError(f"{path}: values do not convert to {np.dtype(dtype)} ({expected})")


def _line_of_row(path, row):
    """Line number of the `row`-th (0-based) non-blank line (for error messages only: it reads the file)."""
    with open(path, "rb") as f:
        nonblank = (lineno for lineno, line in enumerate(f, 1) if line.strip())
        return next(itertools.islice(nonblank, row, None), None)


def read_template_media_list(path):
    """`t_face_tid_mid.txt` -> (image names [N], template ids (N,) int64, media ids (N,) int64, line of each)."""
    expected = "'image template_id media_id'"
    fields, lines = _read_fields(path, 3, expected)
    ids = _to_numbers(path, fields[:, 1:], lines, np.int64, expected)
    return [name.decode("utf-8") for name in fields[:, 0]], ids[:, 0].copy(), ids[:, 1].copy(), lines


def read_landmarks(path):
    """`t_name_5pts_score.txt` -> (image names [N], landmarks (N, 5, 2) float32 (x, y), detector scores (N,),
    line of each)."""
    expected = "'image x1 y1 ... x5 y5 detector_score'"
    fields, lines = _read_fields(path, 12, expected)
    values = _to_numbers(path, fields[:, 1:], lines, np.float64, expected)
    names = [name.decode("utf-8") for name in fields[:, 0]]
    return names, values[:, :10].reshape(-1, 5, 2).astype(np.float32), values[:, 10].astype(np.float32), lines


def read_template_pair_list(path):
    """`t_template_pair_label.txt` -> (pairs (P, 2) int64 template ids, labels (P,) int64 in {0, 1})."""
    expected = "'template_a template_b label', integers"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an empty file is reported below
            table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)  # C parser: 15.7M lines in seconds
    except ValueError:
        table = None
    if table is None or table.shape[0] == 0 or table.shape[1] != 3:
        fields, lines = _read_fields(path, 3, expected)  # slower, but says where
        table = _to_numbers(path, fields, lines, np.int64, expected)
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if bad.size:
        raise IJBMetaError(f"{path}, line {_line_of_row(path, int(bad[0]))}: label {table[bad[0], 2]} is not 0 or 1")
    return table[:, :2].copy(), table[:, 2].copy()


def read_1n_list(path):
    """A 1:N gallery or probe CSV (header naming at least TEMPLATE_ID, SUBJECT_ID, FILENAME, any order,
    extra columns ignored; one row per image) -> (template ids (T,) int64, subject ids (T,) int64, line of
    each template's first row), one entry per template in file order. FILENAME is only checked to be
    there: images are tied to templates by the tid_mid list, whose names are the loose_crop files."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        columns = {name.strip().upper(): i for i, name in enumerate(header or [])}
        missing = [c for c in CSV_COLUMNS if c not in columns]
        if missing:
            raise IJBMetaError(f"{path}, line 1: header must name {', '.join(CSV_COLUMNS)}; missing {missing}, "
                               f"found {header}")
        t_col, s_col, f_col = (columns[c] for c in CSV_COLUMNS)
        subject_of, first_line = {}, {}
        for row in reader:
            lineno = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise IJBMetaError(f"{path}, line {lineno}: expected {len(header)} fields as the header, found "
                                   f"{len(row)}: {row}")
            try:
                template, subject = int(row[t_col]), int(row[s_col])
            except ValueError:
                raise IJBMetaError(f"{path}, line {lineno}: TEMPLATE_ID and SUBJECT_ID must be integers, found "
                                   f"{row[t_col]!r}, {row[s_col]!r}") from None
            if not row[f_col].strip():
                raise IJBMetaError(f"{path}, line {lineno}: empty FILENAME")
            if subject_of.setdefault(template, subject) != subject:
                raise IJBMetaError(f"{path}, line {lineno}: template {template} has subject {subject} here but "
                                   f"{subject_of[template]} on line {first_line[template]}")
            first_line.setdefault(template, lineno)
    if not subject_of:
        raise IJBMetaError(f"{path}: no rows after the header")
    templates = np.fromiter(subject_of.keys(), dtype=np.int64, count=len(subject_of))
    subjects = np.fromiter(subject_of.values(), dtype=np.int64, count=len(subject_of))
    return templates, subjects, np.array([first_line[t] for t in subject_of])


@dataclass
class IJBMeta:
    """Everything the evaluation reads from `root/meta`, checked against `root/loose_crop`."""
    root: str
    target: str
    names: list  # image file names in loose_crop, (N,)
    landmarks: np.ndarray  # (N, 5, 2) float32
    faceness: np.ndarray  # (N,) float32 detector scores
    templates: np.ndarray  # (N,) int64
    medias: np.ndarray  # (N,) int64
    pair_templates: np.ndarray  # (P, 2) int64
    pair_labels: np.ndarray  # (P,) int64, 1 = same subject
    galleries: dict = field(default_factory=dict)  # name -> (template ids, subject ids); empty without 1:N
    probe: tuple = None  # (template ids, subject ids) or None

    @property
    def image_dir(self):
        return os.path.join(self.root, "loose_crop")

    def meta_path(self, pattern):
        return os.path.join(self.root, "meta", pattern.format(t=self.target))


def _check_target(target):
    target = str(target).lower()
    if target not in TARGETS:
        raise InputError(f"unknown IJB target {target!r}; valid: {list(TARGETS)}")
    return target


def _check_images_exist(image_dir, names, listed_in, lines):
    """One listdir of loose_crop; names with a folder part are checked one by one."""
    if not os.path.isdir(image_dir):
        raise IJBMetaError(f"{image_dir}: image folder missing (the images of {listed_in})")
    present = set(os.listdir(image_dir))
    missing = [i for i, name in enumerate(names)
               if name not in present and not ("/" in name and os.path.isfile(os.path.join(image_dir, name)))]
    if missing:
        shown = ", ".join(f"line {lines[i]} {names[i]!r}" for i in missing[:5])
        raise IJBMetaError(f"{listed_in}: {len(missing)} of {len(names)} images are missing from {image_dir}: "
                           f"{shown}{', ...' if len(missing) > 5 else ''}")


def _check_templates_known(path, templates, known, lines, what, listed_in):
    """Every template id of `path` must have images; `lines`: the line of each entry, or None to look it up."""
    unknown = np.flatnonzero(rows_of(templates, known) < 0)
    if unknown.size:
        i = int(unknown[0])
        lineno = lines[i] if lines is not None else _line_of_row(path, i)
        raise IJBMetaError(f"{path}, line {lineno}: {what} {templates[i]} has no images in {listed_in} "
                           f"({unknown.size} unknown in this file)")


def _line(lines, i):
    return lines[i] if i < len(lines) else "end of file"


def load_ijb_meta(root, target="ijbc", check_images=True):
    """Read and cross-check every meta file of an IJB root; raise IJBMetaError naming file and line."""
    root, target = os.fspath(root), _check_target(target)
    meta = os.path.join(root, "meta")
    tid_mid_path = os.path.join(meta, f"{target}_face_tid_mid.txt")
    pts_path = os.path.join(meta, f"{target}_name_5pts_score.txt")
    pair_path = os.path.join(meta, f"{target}_template_pair_label.txt")
    for path in (tid_mid_path, pts_path, pair_path):
        if not os.path.isfile(path):
            raise IJBMetaError(f"{path}: missing (IJB layout: loose_crop/ and meta/{target}_*.txt under {root})")

    names, templates, medias, tid_mid_lines = read_template_media_list(tid_mid_path)
    pts_names, landmarks, faceness, pts_lines = read_landmarks(pts_path)
    if pts_names != names:
        i = next((k for k, (a, b) in enumerate(zip(names, pts_names)) if a != b), min(len(names), len(pts_names)))
        a = repr(names[i]) if i < len(names) else "nothing (end of file)"
        b = repr(pts_names[i]) if i < len(pts_names) else "nothing (end of file)"
        raise IJBMetaError(f"{tid_mid_path} and {pts_path} must list the same images in the same order: "
                           f"image {i + 1} is {a} ({tid_mid_path}, line {_line(tid_mid_lines, i)}) but {b} "
                           f"({pts_path}, line {_line(pts_lines, i)})")
    if check_images:
        _check_images_exist(os.path.join(root, "loose_crop"), names, pts_path, pts_lines)

    pair_templates, pair_labels = read_template_pair_list(pair_path)
    known = np.unique(templates)
    for column in (0, 1):
        _check_templates_known(pair_path, pair_templates[:, column], known, None, "template", tid_mid_path)

    result = IJBMeta(root, target, names, landmarks, faceness, templates, medias, pair_templates, pair_labels)
    probe_path = result.meta_path(PROBE_FILE)
    for gallery, patterns in GALLERY_FILES.items():
        path = next((p for p in map(result.meta_path, patterns) if os.path.isfile(p)), None)
        if path is not None and os.path.isfile(probe_path):
            g_templates, g_subjects, g_lines = read_1n_list(path)
            _check_templates_known(path, g_templates, known, g_lines, "gallery template", tid_mid_path)
            result.galleries[gallery] = (g_templates, g_subjects)
    if result.galleries:
        p_templates, p_subjects, p_lines = read_1n_list(probe_path)
        _check_templates_known(probe_path, p_templates, known, p_lines, "probe template", tid_mid_path)
        result.probe = (p_templates, p_subjects)
    return result


def rows_of(ids, unique_sorted):
    """The row of each id (any shape) in `unique_sorted` (sorted unique int64 ids), -1 where it is absent."""
    ids = np.asarray(ids, dtype=np.int64)
    lo, hi = int(unique_sorted[0]), int(unique_sorted[-1])
    if hi - lo <= 4 * max(ids.size, unique_sorted.size):  # a lookup table beats a binary search per id
        table = np.full(hi - lo + 1, -1, dtype=np.int64)
        table[unique_sorted - lo] = np.arange(unique_sorted.size)
        return np.where((ids >= lo) & (ids <= hi), table[np.clip(ids - lo, 0, hi - lo)], -1)
    pos = np.minimum(np.searchsorted(unique_sorted, ids), unique_sorted.size - 1)
    return np.where(unique_sorted[pos] == ids, pos, -1)


def template_rows(unique_templates, template_ids):
    rows = rows_of(template_ids, unique_templates)
    if (rows < 0).any():
        unknown = np.unique(np.asarray(template_ids)[rows < 0])
        raise KeyError(f"templates without features: {unknown[:10].tolist()}")
    return rows
