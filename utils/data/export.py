"""Export a selection of a dataset as a dataset folder of its own, copying records byte for byte.

A kept list (and the label map that goes with it) becomes a folder that any stage opens with no
kept list: `open_dataset(DST)` lists exactly the kept images, with the renumbered labels, in the
order training on the source with the kept list sees them (see `export_dataset`).

RecordIO sources are written in the InsightFace layout by utils/data/writer.py (payloads copied
byte for byte, streamed in bounded chunks, the folder staged and renamed into place).

Beside the records: `origin_index.npy` (new sample index -> source sample index, int64), the
verification `.bin` files and `ijb/` (hard links, or copies where a hard link is refused), `noise.json`
remapped to the new sample indices when the source has one, and the manifest `export.json`.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.arrays import label_map_for
from utils.artifacts.files import (ArtifactError, Fingerprint, atomic_save_npy, atomic_write_json, label_map_array,
                             load_kept_index, load_label_map, manifest_path, validate_kept_index)
from utils.artifacts.records import load_relabel
from utils.data.datasets import FaceDataset, ImageFolderDataset, open_dataset
from utils.data.recordio import read_property
from utils.data.writer import (EXPORT_MANIFEST, ORIGIN_INDEX, carry_files, check_destination,
                                 file_sha256, link_or_copy, staged_folder, write_recordio)
from utils.data.noise_file import NOISE_FILE, load_noise, noise_record, true_identities

# ------------------------------------------------------------------------------------------ the plan
@dataclass
class ExportPlan:
    """What the exported folder holds: new sample j is source sample `origin_index[j]` with label `labels[j]`."""
    origin_index: np.ndarray  # int64 (M,)
    labels: np.ndarray  # int64 (M,), sorted ascending
    num_classes: int
    label_table: np.ndarray  # int64 (source classes,): old label -> new label, -1 for identities that vanish
    inputs: dict  # what the manifest records about the selection, label map and relabel file


def _describe(path, what: str, count=None) -> dict:
    info = {"path": os.path.abspath(path), "sha256": file_sha256(path)} if path is not None else {"path": None}
    if count is not None:
        info[what] = count
    return info


def _as_path(value):
    return value if isinstance(value, (str, os.PathLike)) else None


def plan_export(dataset, kept_index=None, label_map=None, relabel=None) -> ExportPlan:
    """Resolve the selection against `dataset` (a `FaceDataset`); every input is checked before a byte is written.

    `kept_index`: a file (toolkit `.npy` with manifest, a plain `.npy` as `numpy.save` writes one, or the
    paper's `kept_index = [...]` text), an array
    of sample indices, or None (every sample). `label_map`: a label-map JSON, a dict, or None (the
    contiguous map of the labels that survive). `relabel`: cleaning's `relabel.npz` (index, label,
    suggested_label) or None; its samples take the suggested label before renumbering.
    """
    fp = dataset.fingerprint
    assigned = dataset.all_labels.copy()  # each sample's label after --relabel, in the source's numbering
    inputs = {"relabel": None}
    if relabel is not None:
        index, suggested = load_relabel(relabel, dataset)
        assigned[index] = suggested
        inputs["relabel"] = _describe(relabel, "relabelled", int(index.size))

    if kept_index is None:
        kept = np.arange(fp.num_images, dtype=np.int64)
    elif _as_path(kept_index) is not None:
        kept = load_kept_index(kept_index, fp, plain=True)  # a plain .npy (no manifest) after its checks
    else:
        kept = validate_kept_index(kept_index, fp.num_images)
    inputs["selection"] = _describe(_as_path(kept_index), "kept", int(kept.size))
    if _as_path(kept_index) is not None:  # false: a plain or text list, whose dataset could not be checked
        inputs["selection"]["manifest"] = manifest_path(kept_index).exists()

    if label_map is None:
        label_map = label_map_for(kept, assigned)
        inputs["label_map"] = {"path": None, "derived": "contiguous map of the surviving labels (ascending)"}
    else:
        map_path = _as_path(label_map)
        label_map = load_label_map(map_path, fp) if map_path is not None else dict(label_map)
        inputs["label_map"] = _describe(map_path, "num_classes", len(label_map))
    table = label_map_array(label_map, dataset.source_num_classes)
    new = table[assigned[kept]]
    where = _as_path(inputs["label_map"]["path"]) or "the label map"
    if (new < 0).any():
        i = int(np.flatnonzero(new < 0)[0])
        raise ArtifactError(f"{where}: has no new label for identity {int(assigned[kept[i]])} of kept sample "
                            f"{int(kept[i])} ({int((new < 0).sum())} kept samples unmapped); it does not go with "
                            f"this kept list")
    empty = np.setdiff1d(np.arange(len(label_map)), new)
    if empty.size:
        raise ArtifactError(f"{where}: new label {int(empty[0])} has no kept sample ({empty.size} such labels); the "
                            f"InsightFace layout has no empty identities")
    order = np.argsort(new, kind="stable")
    return ExportPlan(kept[order], new[order], len(label_map), table, inputs)


# ------------------------------------------------------------------------------------------ noise.json
def remap_noise(noise: dict, plan: ExportPlan, source_labels: np.ndarray) -> dict:
    """The source's `noise.json` for the exported samples: surviving samples only, new indices and labels.

    A sample is noisy in the export when its true identity (from the source's ground truth) is not its
    exported label: an open-set outlier stays one, and a flipped sample whose true identity vanished
    becomes one (no class of the export shows it); with --relabel, a sample moved to its true identity
    is clean again and a clean sample moved elsewhere is a flip.
    """
    truth = true_identities(source_labels, noise)[plan.origin_index]
    known = truth >= 0
    true_new = np.full(truth.shape, -1, dtype=np.int64)
    true_new[known] = plan.label_table[truth[known]]
    return noise_record(plan.labels, true_new, noise.get("flip_rate"), noise.get("open_rate"), noise.get("seed"),
                        plan.num_classes)


# ------------------------------------------------------------------------------------------ export
def _dataset_bytes(dataset) -> int:
    if hasattr(dataset, "layout"):
        return sum((dataset.rec_dir / name).stat().st_size for name in ("train.rec", "train.idx"))
    return sum((dataset.root / f).stat().st_size for f in dataset.files)


def _export_image_folder(dataset, plan: ExportPlan, tmp: Path) -> tuple[np.ndarray, dict]:
    """Link (or copy) the kept images into `tmp/<identity>/<file>`; returns (origin index in listing order, modes).

    An identity folder keeps the name of the source identity its new label came from; where those
    names would not sort in new-label order (a label map that reorders, or --relabel), the name gets a
    zero-padded new-label prefix, since `ImageFolderDataset` numbers identities in sorted folder order.
    """
    identities = sorted(d.name for d in dataset.root.iterdir() if d.is_dir())  # as ImageFolderDataset numbers them
    ident_of_file = np.array([f.split("/", 1)[0] for f in dataset.files])
    basename = np.array([f.split("/", 1)[1] for f in dataset.files])
    source_of = np.zeros(plan.num_classes, dtype=np.int64)  # new label -> the source label it renumbers
    mapped = np.flatnonzero(plan.label_table >= 0)
    source_of[plan.label_table[mapped]] = mapped
    names = [identities[old] for old in source_of.tolist()]
    if any(a >= b for a, b in zip(names[:-1], names[1:])):
        width = len(str(plan.num_classes - 1))
        names = [f"{c:0{width}d}_{name}" for c, name in enumerate(names)]
    origin = plan.origin_index
    # A file --relabel moved to another identity is prefixed with the identity it came from (no name clash).
    moved = dataset.all_labels[origin] != source_of[plan.labels]
    files = np.where(moved, np.char.add(np.char.add(ident_of_file[origin], "__"), basename[origin]), basename[origin])
    order = np.lexsort((files, plan.labels))  # the order ImageFolderDataset lists them in
    for name in names:
        (tmp / name).mkdir()
    modes = {link_or_copy(dataset.root / dataset.files[origin[i]], tmp / names[plan.labels[i]] / files[i])
             for i in order.tolist()}
    return origin[order], {"images": " and ".join(sorted(modes))}


def export_dataset(src, kept_index, label_map, dst, relabel=None, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Write the selection of dataset `src` as the dataset folder `dst` (all of it or nothing); returns a summary.

    `src`: a dataset folder, or a `FaceDataset` already opened on one (its own selection is ignored).
    `kept_index`, `label_map`, `relabel`: see `plan_export`. New samples are sorted by new label, stable in
    source order; for an InsightFace-layout source (images contiguous per identity, as in CASIA-WebFace)
    with a label map that keeps the label order (the derived one does), that is exactly the kept order.
    A RecordIO source exports as RecordIO (InsightFace layout), an image folder as an image folder.
    """
    t0 = time.time()
    dataset = src if isinstance(src, FaceDataset) else open_dataset(src)
    src = Path(dataset.rec_dir if hasattr(dataset, "layout") else dataset.root)
    plan = plan_export(dataset, kept_index, label_map, relabel)
    dst = check_destination(src, dst, overwrite)
    noise = load_noise(src)
    is_recordio = hasattr(dataset, "layout")
    try:
        with staged_folder(dst) as tmp:
            if is_recordio:
                write_recordio(dataset.layout, tmp, plan.origin_index, plan.labels, plan.num_classes,
                               progress=progress)
                prop = read_property(src / "property")
                if prop is not None:
                    (tmp / "property").write_text(f"{plan.num_classes},{prop[1]},{prop[2]}\n")
                origin, carried = plan.origin_index, carry_files(src, tmp)
            else:
                origin, carried = _export_image_folder(dataset, plan, tmp)
                carried.update(carry_files(src, tmp, folders=()))  # no ijb/: it would read as an identity
                plan.origin_index = origin  # the listing order (labels stay sorted)
            atomic_save_npy(tmp / ORIGIN_INDEX, origin)
            exported_noise = remap_noise(noise, plan, dataset.all_labels) if noise is not None else None
            if exported_noise is not None:
                atomic_write_json(tmp / NOISE_FILE, exported_noise)
            fingerprint, bytes_after = _written(tmp, plan, is_recordio)
            summary = _summary(src, dst, dataset, plan, bytes_after, carried, exported_noise, t0)
            atomic_write_json(tmp / EXPORT_MANIFEST, _manifest(src, dataset, fingerprint, plan, summary))
    except OSError as exc:
        raise ArtifactError(f"writing {dst} failed: {exc.strerror or exc} ({exc.filename})") from None
    return summary


def _written(tmp: Path, plan: ExportPlan, is_recordio: bool) -> tuple[Fingerprint, int]:
    """(fingerprint, bytes) of the exported dataset, as `open_dataset` will see it (without reading it back)."""
    if is_recordio:
        sizes = [(tmp / name).stat().st_size for name in ("train.rec", "train.idx")]
        return Fingerprint(int(plan.labels.size), plan.num_classes, sizes[1]), sum(sizes)
    out = ImageFolderDataset(tmp)
    return out.fingerprint, _dataset_bytes(out)


def _summary(src, dst, dataset, plan, bytes_after, carried, noise, t0) -> dict:
    before = _dataset_bytes(dataset)
    return {
        "out": str(dst), "source": os.path.abspath(src),
        "format": "recordio" if hasattr(dataset, "layout") else "image_folder",
        "images_before": dataset.num_images, "images_after": int(plan.labels.size),
        "identities_before": dataset.source_num_classes, "identities_after": plan.num_classes,
        "bytes_before": before, "bytes_after": bytes_after, "saving_percent": 100.0 * (1 - bytes_after / before),
        "kept_order": bool(np.all(np.diff(plan.origin_index) > 0)),
        "carried": carried, "noise": None if noise is None else
        {"flipped": len(noise["flipped"]), "open_set": len(noise["open_set"])},
        "seconds": time.time() - t0,
    }


def _manifest(src, dataset, fingerprint, plan, summary) -> dict:
    return {
        "stage": "export_trainset", "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "source": {"path": os.path.abspath(src), "fingerprint": dataset.fingerprint.to_dict()},
        "fingerprint": fingerprint.to_dict(), **plan.inputs,
        "counts": {k: summary[k] for k in ("images_before", "images_after", "identities_before", "identities_after")},
        "bytes": {"before": summary["bytes_before"], "after": summary["bytes_after"]},
        "order": "kept order" if summary["kept_order"] else "sorted by new label, stable in source order",
        "carried": summary["carried"], "noise": summary["noise"],
    }


def format_summary(summary: dict) -> str:
    """The lines `export_trainset.py` prints."""
    mb = 1 << 20
    carried = ", ".join(f"{k} ({v})" for k, v in summary["carried"].items()) or "nothing"
    lines = [
        f"exported {summary['source']} -> {summary['out']} ({summary['format']})",
        f"images {summary['images_before']} -> {summary['images_after']}, identities "
        f"{summary['identities_before']} -> {summary['identities_after']}",
        f"bytes {summary['bytes_before'] / mb:.1f} MB -> {summary['bytes_after'] / mb:.1f} MB "
        f"(saving {summary['saving_percent']:.1f}%), in {summary['seconds']:.1f} s",
        f"order: {'the kept order' if summary['kept_order'] else 'sorted by new label (see origin_index.npy)'}; "
        f"carried: {carried}",
    ]
    if summary["noise"] is not None:
        lines.append(f"noise.json remapped: {summary['noise']['flipped']} flipped, "
                     f"{summary['noise']['open_set']} open-set samples survive")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- export_trainset.py
