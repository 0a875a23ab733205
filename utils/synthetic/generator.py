"""A learnable stand-in for a face-recognition dataset, written in the real formats (InsightFace
RecordIO, `.bin` verification pairs, the IJB release layout).

Over 600 lines on purpose: one seeded generator whose drawing order fixes every byte it writes (identities,
noise, redundancy, verification pairs, IJB templates share one random stream per part); kept in one module so
that the order is read in one place. No stage imports it (make_synthetic_dataset.py and the tests do).

Each identity is a parametric face: landmark geometry around the ArcFace template, face oval, eyes,
brows, nose, mouth, skin/hair/eye colouring, a skin texture and accessories. It is painted once into
a canonical frame (the 112 x 112 ArcFace frame, extended so that loose crops show hair and neck);
each image warps that painting with a pose (similarity jitter, yaw/pitch displacement, expression)
and adds background, occlusion, illumination, blur and noise. Identities are drawn in families that
share colouring and face shape, so some impostor pairs are hard.

Every random draw comes from a generator seeded by (seed, stream, which thing) alone, so the files
are byte-identical for a seed whatever the generation order or the number of worker processes.

Folder written by `generate_dataset` (see `make_synthetic_dataset.py --help`):

    train.rec, train.idx, property    InsightFace RecordIO layout, images contiguous per label
    syn_frontal.bin, syn_pose.bin     verification pairs of held-out identities
    ijb/loose_crop/<n>.jpg, ijb/meta/ijbc_*, ijb/meta/ijbb_*
                                      IJB-C and IJB-B release layouts, held-out subjects (disjoint)
    noise.json                        injected label flips and open-set outliers (sample indices)
    redundancy.json                   near-duplicates: which sample re-shoots which (sample indices)
    dataset.json                      generator arguments, per-identity counts, held-out identities
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from tqdm import tqdm

from utils.data.alignment import ARCFACE_TEMPLATE_112
from utils.data import recordio
from utils.data.noise_file import noise_record
from utils.artifacts.files import atomic_write_json

JPEG_QUALITY = 95
# Within a redundant identity, at most this share of images re-shoot an earlier image (the rest are the
# originals they re-shoot).
MAX_DUP_SHARE = 0.7
# The painted canonical frame, in units of the 112 x 112 ArcFace frame: wider than 0..112 so that
# a loose crop (face smaller than its crop) still shows hair, ears and neck instead of an edge.
CANVAS_MIN, CANVAS_MAX = -40.0, 152.0
# Centre of the pose displacement fields (between the eyes and the mouth).
FACE_CENTRE = np.array([56.0, 64.0])
# Canonical units the inner features move at |yaw| = 1 (outline moves less: a turned head).
YAW_SHIFT = 12.0
PITCH_SHIFT = 5.0
# Verification sets of held-out identities and the variation profile each one is rendered with.
BIN_PROFILES = {"syn_frontal": "frontal", "syn_pose": "pose"}
VERIFICATION_BINS = tuple(BIN_PROFILES)
# IJB targets the generator writes under ijb/ (one loose_crop/ folder, disjoint image sets and subjects):
# the prefix of the random streams of each, and the names of its two 1:N galleries in the real release.
IJB_TARGETS = {"ijbc": {"stream": "ijb", "galleries": ("G1", "G2")},
               "ijbb": {"stream": "ijbb", "galleries": ("S1", "S2")}}

# One number per random stream; a generator is seeded by (seed, stream, keys...).
_STREAM = {
    "plan": 1, "identity": 2, "family": 3, "train": 4, "train_dup": 5, "pairs": 6, "pair_image": 7,
    "ijb_plan": 8, "ijb_image": 9, "ijb_frame": 10, "ijb_detector": 11,
    "ijbb_plan": 12, "ijbb_image": 13, "ijbb_frame": 14, "ijbb_detector": 15,
}


def _rng(seed: int, stream: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM[stream], *map(int, keys)]))


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SyntheticConfig:
    """Everything the generated files depend on (recorded in dataset.json)."""
    num_ids: int = 500
    image_size: int = 112
    seed: int = 0
    flip_rate: float = 0.05
    open_rate: float = 0.02
    redundancy: float = 0.05
    redundant_id_share: float = 0.3
    min_images: int = 5
    max_images: int = 200
    median_images: float = 20.0
    num_val_ids: int = 100
    val_pairs: int = 3000
    ijb_ids: int = 50
    ijb_templates: int = 200
    ijb_targets: str = "ijbc,ijbb"
    ijb_crop_scale: float = 1.6
    family_size: float = 4.0

    def validate(self):
        asked_ijb = self._asked_ijb_targets()
        checks = [
            (self.num_ids >= 2, "num_ids must be >= 2"),
            (self.image_size >= 16, "image_size must be >= 16"),
            (self.seed >= 0, "seed must be >= 0"),
            (0 <= self.flip_rate < 0.5 and 0 <= self.open_rate < 0.5, "flip_rate and open_rate must lie in [0, 0.5)"),
            (self.flip_rate + self.open_rate < 0.5, "flip_rate + open_rate must be < 0.5"),
            (0 < self.redundant_id_share <= 1, "redundant_id_share must lie in (0, 1]"),
            (0 <= self.redundancy <= MAX_DUP_SHARE * self.redundant_id_share,
             f"redundancy must lie in [0, {MAX_DUP_SHARE} * redundant_id_share] (at most {MAX_DUP_SHARE:.0%} of a "
             f"redundant identity's images re-shoot; for more, raise redundant_id_share, 1: all identities)"),
            (1 <= self.min_images <= self.max_images, "need 1 <= min_images <= max_images"),
            (self.median_images > 0, "median_images must be > 0"),
            (self.num_val_ids >= 2 or self.val_pairs == 0, "num_val_ids must be >= 2 (or val_pairs 0)"),
            (self.val_pairs >= 0, "val_pairs must be >= 0"),
            (self.ijb_ids >= 2 or self.ijb_templates == 0, "ijb_ids must be >= 2 (or ijb_templates 0)"),
            (self.ijb_templates == 0 or self.ijb_templates >= 2 * self.ijb_ids,
             "ijb_templates must be >= 2 * ijb_ids (two templates per subject make genuine pairs)"),
            (self.ijb_templates == 0 or (asked_ijb and set(asked_ijb) <= set(IJB_TARGETS)
                                         and len(set(asked_ijb)) == len(asked_ijb)),
             f"ijb_targets must be a comma-separated list of distinct names among {', '.join(IJB_TARGETS)}"),
            (self.ijb_crop_scale >= 1.2, "ijb_crop_scale must be >= 1.2 (loose crops hold background)"),
            (self.family_size >= 1, "family_size must be >= 1"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("invalid synthetic dataset config: " + "; ".join(bad))
        return self

    def _asked_ijb_targets(self) -> list:
        return [t.strip().lower() for t in self.ijb_targets.split(",") if t.strip()]

    @property
    def ijb_target_list(self) -> tuple:
        """The IJB targets to write, in the order of IJB_TARGETS whatever the order asked (it fixes the
        image numbers: IJB-C's files are the same with or without IJB-B)."""
        asked = self._asked_ijb_targets()
        return tuple(t for t in IJB_TARGETS if t in asked)

    # Identity numbers (uids) of the disjoint populations; appearance is a function of the uid.
    # IJB-B subjects come last, so that adding them moves no other population (nor the family count).
    @property
    def num_open_ids(self) -> int:
        return max(1, math.ceil(self.num_ids / 10))

    @property
    def val_uid0(self) -> int:
        return self.num_ids

    @property
    def ijb_uid0(self) -> int:
        return self.num_ids + self.num_val_ids

    @property
    def open_uid0(self) -> int:
        return self.num_ids + self.num_val_ids + self.ijb_ids

    @property
    def ijbb_uid0(self) -> int:
        return self.open_uid0 + self.num_open_ids

    def ijb_uid_range(self, target: str) -> tuple:
        uid0 = {"ijbc": self.ijb_uid0, "ijbb": self.ijbb_uid0}[target]
        return uid0, uid0 + self.ijb_ids

    @property
    def num_families(self) -> int:
        total = self.open_uid0 + self.num_open_ids  # IJB-B subjects join these families
        return max(1, round(total / self.family_size))


@dataclass(frozen=True)
class VariationProfile:
    """Ranges of the per-image variation. Angles in degrees, lengths in 112-frame pixels."""
    rotation: float        # sd of in-plane rotation
    log_scale: float       # sd of log scale
    shift: float           # sd of translation
    yaw: tuple             # range of |yaw| (1: strongly turned), sign random
    pitch: float           # max |pitch|
    expression: float      # max |smile|
    gain: tuple            # brightness gain range
    cast: float            # sd of per-channel gain
    gradient: float        # max strength of a linear lighting gradient
    gamma: float           # sd of log gamma
    blur: tuple            # Gaussian sigma range
    lowres: float          # probability of down- and up-sampling by 1.5-3x
    noise: tuple           # sd range of pixel noise, grey levels
    occlusion: float       # probability of an occluder (sunglasses, mask, hat, object)


PROFILES = {
    "train": VariationProfile(rotation=6, log_scale=0.05, shift=2.5, yaw=(0.0, 0.7), pitch=0.4, expression=0.8,
                              gain=(0.55, 1.35), cast=0.08, gradient=0.6, gamma=0.15, blur=(0.0, 1.6),
                              lowres=0.2, noise=(0.0, 10.0), occlusion=0.2),
    "frontal": VariationProfile(rotation=3, log_scale=0.03, shift=1.5, yaw=(0.0, 0.25), pitch=0.15, expression=0.4,
                                gain=(0.8, 1.2), cast=0.04, gradient=0.25, gamma=0.08, blur=(0.0, 0.8),
                                lowres=0.0, noise=(0.0, 5.0), occlusion=0.0),
    "pose": VariationProfile(rotation=10, log_scale=0.07, shift=3.0, yaw=(0.45, 1.0), pitch=0.5, expression=1.0,
                             gain=(0.5, 1.4), cast=0.1, gradient=0.8, gamma=0.2, blur=(0.0, 2.0),
                             lowres=0.3, noise=(0.0, 12.0), occlusion=0.4),
    "ijb": VariationProfile(rotation=8, log_scale=0.0, shift=0.0, yaw=(0.0, 0.9), pitch=0.4, expression=0.8,
                            gain=(0.55, 1.35), cast=0.08, gradient=0.6, gamma=0.15, blur=(0.0, 1.6),
                            lowres=0.2, noise=(0.0, 10.0), occlusion=0.25),
}
OCCLUDERS = ("sunglasses", "mask", "hat", "object")


# ----------------------------------------------------------------------------------------------
# Identities
# ----------------------------------------------------------------------------------------------

SKIN_DARK = np.array([70.0, 45.0, 32.0])
SKIN_LIGHT = np.array([245.0, 208.0, 182.0])
HAIR_PALETTE = np.array([[22, 18, 16], [55, 38, 26], [105, 70, 42], [190, 155, 95], [150, 68, 34],
                         [150, 148, 145], [230, 225, 215]], np.float64)
HAIR_STYLES = ("short", "long", "bald", "fringe", "volume")
EYE_PALETTE = np.array([[60, 38, 22], [95, 62, 35], [70, 110, 150], [80, 120, 70], [40, 30, 25]], np.float64)


@dataclass
class FaceParams:
    """The stable appearance of one identity (canonical 112-frame units, RGB colours 0..255)."""
    uid: int
    family: int
    landmarks: np.ndarray          # (5, 2): eyes, nose tip, mouth corners
    face: np.ndarray               # cx, cy, a, b, chin exponent, top exponent
    skin: np.ndarray               # (3,)
    skin_texture: np.ndarray       # (5, 5) relative brightness field
    hair_colour: np.ndarray
    hair_style: int
    hair: np.ndarray               # forehead height, hairline curve, volume, strand frequency, strand angle, parting
    ears: float
    eye: np.ndarray                # half width, half height, tilt (deg), iris fraction
    iris_colour: np.ndarray
    brow: np.ndarray               # height above eye, half length, thickness, angle (deg), arch, inner offset
    brow_colour: np.ndarray
    nose: np.ndarray               # nostril offset, nostril size, bridge side, tip size
    mouth: np.ndarray              # upper lip, lower lip, curve
    lip_colour: np.ndarray
    beard: np.ndarray              # density (0: none), kind (0 moustache, 1 chin, 2 full)
    glasses: np.ndarray            # on (0/1), frame grey, thickness
    moles: np.ndarray              # (k, 3): u, v, radius


def _procrustes_normalise(points, template):
    """Remove the similarity part of `points` relative to `template`.

    Alignment maps the landmarks to the template by the best similarity; what is left of an
    identity's geometry after that is its non-similar shape, which is what an aligned face shows.
    """
    p = points - points.mean(0)
    t = template - template.mean(0)
    # complex least squares: t ~ z * p
    pc = p[:, 0] + 1j * p[:, 1]
    tc = t[:, 0] + 1j * t[:, 1]
    z = np.vdot(pc, tc) / np.vdot(pc, pc)
    q = z * pc
    return np.stack([q.real, q.imag], 1) + template.mean(0)


@lru_cache(maxsize=None)
def _family_traits(seed: int, family: int) -> dict:
    rng = _rng(seed, "family", family)
    return {
        "skin_t": rng.beta(1.6, 1.6),
        "skin_tint": rng.normal(0, 6, 3),
        "hair_colour": HAIR_PALETTE[rng.integers(len(HAIR_PALETTE))] * rng.uniform(0.85, 1.15),
        "hair_style": int(rng.integers(len(HAIR_STYLES))),
        "face_ab": np.array([rng.uniform(35, 42), rng.uniform(47, 55)]),
        "chin": rng.uniform(1.6, 2.6),
        "iris_colour": EYE_PALETTE[rng.integers(len(EYE_PALETTE))],
        "shape": rng.normal(0, 1, 6),
    }


def sample_identity(cfg: SyntheticConfig, uid: int) -> FaceParams:
    """The appearance of identity `uid`: a family (colouring, face shape) plus individual traits."""
    rng = _rng(cfg.seed, "identity", uid)
    family = int(rng.integers(cfg.num_families))
    fam = _family_traits(cfg.seed, family)
    template = ARCFACE_TEMPLATE_112

    # Landmark geometry: half family, half individual; mirrored components keep faces near-symmetric.
    g = 0.5 * fam["shape"] + 0.75 * rng.normal(0, 1, 6)
    eye_dx, eye_dy, nose_dy, nose_dx, mouth_dy, mouth_w = g * np.array([2.2, 1.5, 2.5, 0.8, 2.5, 2.8])
    offsets = np.array([[-eye_dx, eye_dy], [eye_dx, eye_dy], [nose_dx, nose_dy],
                        [-mouth_w, mouth_dy], [mouth_w, mouth_dy]]) + rng.normal(0, 0.5, (5, 2))
    landmarks = _procrustes_normalise(template + offsets, template)

    eye_c = landmarks[:2].mean(0)
    mouth_c = landmarks[3:].mean(0)
    a, b = fam["face_ab"] + rng.normal(0, [1.5, 1.8])
    face = np.array([eye_c[0] + rng.normal(0, 0.6), (eye_c[1] + mouth_c[1]) / 2 - 11 + rng.normal(0, 1.5),
                     a, b, fam["chin"] + rng.normal(0, 0.2), rng.uniform(2.1, 2.7)])
    skin_t = np.clip(fam["skin_t"] + rng.normal(0, 0.07), 0, 1)
    skin = SKIN_DARK + (SKIN_LIGHT - SKIN_DARK) * skin_t + fam["skin_tint"] + rng.normal(0, 4, 3)

    style = fam["hair_style"] if rng.random() < 0.7 else int(rng.integers(len(HAIR_STYLES)))
    hair_colour = np.clip(fam["hair_colour"] * rng.uniform(0.9, 1.1, 3), 5, 250)
    hair = np.array([rng.uniform(22, 34), rng.uniform(-4, 10), rng.uniform(0, 6), rng.uniform(0.6, 1.6),
                     rng.uniform(0, np.pi), rng.normal(0, 5)])
    brow_colour = np.clip(hair_colour * 0.7 + rng.normal(0, 8, 3), 5, 200)
    beard_on = rng.random() < 0.3
    moles = np.stack([rng.uniform(-0.75, 0.75, 8), rng.uniform(-0.7, 0.75, 8), rng.uniform(0.8, 1.8, 8)], 1)
    moles = moles[: rng.poisson(1.3)] * np.array([a, b, 1.0]) + np.array([face[0], face[1], 0.0])
    return FaceParams(
        uid=int(uid), family=family, landmarks=landmarks, face=face, skin=np.clip(skin, 20, 250),
        skin_texture=rng.normal(0, rng.uniform(0.03, 0.09), (5, 5)),
        hair_colour=hair_colour, hair_style=style, hair=hair, ears=rng.uniform(0.8, 1.2),
        eye=np.array([rng.uniform(5.5, 8.0), rng.uniform(2.3, 3.8), rng.normal(0, 5), rng.uniform(0.75, 1.0)]),
        iris_colour=np.clip(fam["iris_colour"] + rng.normal(0, 10, 3), 5, 200),
        brow=np.array([rng.uniform(7, 11.5), rng.uniform(6.5, 9.5), rng.uniform(1.0, 2.4), rng.normal(0, 8),
                       rng.uniform(-0.5, 2.0), rng.normal(0, 1.2)]),
        brow_colour=brow_colour,
        nose=np.array([rng.uniform(3.5, 6.0), rng.uniform(0.8, 1.3), rng.choice([-1.0, 1.0]), rng.uniform(2.0, 4.0)]),
        mouth=np.array([rng.uniform(1.2, 3.0), rng.uniform(1.8, 4.2), rng.uniform(-1.5, 2.5)]),
        lip_colour=np.clip(skin * rng.uniform(0.6, 0.85) + np.array([rng.uniform(10, 45), 0, 0]), 10, 250),
        beard=np.array([rng.uniform(0.45, 0.9) if beard_on else 0.0, rng.integers(3)]),
        glasses=np.array([float(rng.random() < 0.1), rng.uniform(15, 120), rng.uniform(0.9, 1.6)]),
        moles=moles,
    )


# ----------------------------------------------------------------------------------------------
# Painting an identity into the canonical frame
# ----------------------------------------------------------------------------------------------

class _Canvas:
    """Premultiplied RGBA painting in canonical units; pixel (i, j) is centred on unit CANVAS_MIN + (j, i) / scale."""

    def __init__(self, scale: float):
        n = int(math.ceil((CANVAS_MAX - CANVAS_MIN) * scale)) + 1
        self.scale = scale
        self.axis = (CANVAS_MIN + np.arange(n) / scale).astype(np.float32)
        self.rgba = np.zeros((n, n, 4), np.float32)
        self.rgb, self.alpha = self.rgba[..., :3], self.rgba[..., 3]

    def window(self, u0, u1, v0, v1):
        """Slices of the pixels covering units [u0, u1] x [v0, v1], with broadcastable unit grids U (1, w), V (h, 1)."""
        n = self.axis.size
        j0, j1 = (int(np.clip(math.floor((x - CANVAS_MIN) * self.scale) + d, 0, n)) for x, d in ((u0, -1), (u1, 2)))
        i0, i1 = (int(np.clip(math.floor((y - CANVAS_MIN) * self.scale) + d, 0, n)) for y, d in ((v0, -1), (v1, 2)))
        return (slice(i0, i1), slice(j0, j1)), self.axis[None, j0:j1], self.axis[i0:i1, None]

    def coverage(self, signed_distance):
        """Anti-aliased coverage of a shape from its (approximate) signed distance in units."""
        return np.clip(0.5 - signed_distance * self.scale, 0.0, 1.0)

    def paint(self, sl, coverage, colour):
        coverage = coverage.astype(np.float32, copy=False)
        rgb, alpha = self.rgb[sl], self.alpha[sl]
        rgb += (np.asarray(colour, np.float32) - rgb) * coverage[..., None]
        alpha += (1 - alpha) * coverage

    def ellipse(self, cx, cy, a, b, colour, angle=0.0, opacity=1.0):
        r = max(a, b) + 1
        sl, U, V = self.window(cx - r, cx + r, cy - r, cy + r)
        self.paint(sl, opacity * self.coverage(_ellipse_sd(U, V, cx, cy, a, b, angle)), colour)


def _ellipse_sd(U, V, cx, cy, a, b, angle=0.0):
    """Approximate signed distance (units) to an ellipse with semi-axes a, b rotated by `angle` degrees."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    x = (U - cx) * c + (V - cy) * s
    y = (V - cy) * c - (U - cx) * s
    return (np.sqrt((x / a) ** 2 + (y / b) ** 2) - 1.0) * min(a, b)


def _smooth_field(values, h, w):
    return cv2.resize(np.asarray(values, np.float32), (max(w, 1), max(h, 1)), interpolation=cv2.INTER_CUBIC)


def paint_identity(p: FaceParams, scale: float) -> np.ndarray:
    """Premultiplied RGBA float32 painting of identity `p`, `scale` pixels per canonical unit."""
    cv = _Canvas(scale)
    lm = p.landmarks
    cx, cy, a, b, chin, top = p.face
    eye_y = lm[:2, 1].mean()
    forehead, hair_curve, volume, strand_freq, strand_angle, parting = p.hair
    style = HAIR_STYLES[p.hair_style]

    def hair_colour(U, V):
        # strands sin(f (U cos t + V sin t)), expanded so that only 1-D sines are computed
        fu, fv = strand_freq * math.cos(strand_angle), strand_freq * math.sin(strand_angle)
        strands = np.sin(fu * U) * np.cos(fv * V) + np.cos(fu * U) * np.sin(fv * V)
        if style == "volume":  # crossed strands: curls
            strands *= np.sin(fu * V) * np.cos(fv * U) - np.cos(fu * V) * np.sin(fv * U)
        return p.hair_colour.astype(np.float32) * (1 + 0.14 * strands)[..., None]

    # Long hair falls behind the head and down to the shoulders.
    if style == "long":
        sl, U, V = cv.window(cx - 1.4 * a, cx + 1.4 * a, cy - b - 10, CANVAS_MAX)
        sd = _ellipse_sd(U, V, cx, cy + 12, 1.3 * a + volume, 1.2 * b + volume)
        cv.paint(sl, cv.coverage(sd) * np.clip((CANVAS_MAX - 8 - V) / 12, 0, 1), hair_colour(U, V))
    # Neck, then ears, behind the face.
    sl, U, V = cv.window(cx - 0.6 * a, cx + 0.6 * a, cy + 0.3 * b, CANVAS_MAX)
    sd = np.maximum(np.abs(U - cx) - 0.5 * a, cy + 0.4 * b - V)
    cv.paint(sl, cv.coverage(sd), p.skin * 0.78)
    for side in (-1, 1):
        cv.ellipse(cx + side * 0.97 * a, eye_y + 9, 4.5 * p.ears, 9 * p.ears, p.skin * 0.86, angle=side * 8)

    # Face oval: a superellipse, pointier at the chin, with skin texture and edge shading.
    sl, U, V = cv.window(cx - a - 1, cx + a + 1, cy - b - 1, cy + b + 1)
    x, y = np.abs(U - cx) / a, (V - cy) / b
    q = np.where(y > 0, chin, top)
    sd = (np.power(x ** q + np.abs(y) ** q, 1.0 / q) - 1.0) * min(a, b)
    h, w = sd.shape
    shade = (1 + _smooth_field(p.skin_texture, h, w)) * (1 - 0.22 * np.minimum(x, 1) ** 4)
    cv.paint(sl, cv.coverage(sd), p.skin * shade[..., None])

    # Hair on the head: inside a head outline slightly larger than the face, above the hairline.
    head_a, head_b = 1.07 * a + volume, 1.06 * b + volume
    # below eye_y + 23 there is no hair on the head in any style (long side locks end at eye_y + 22)
    sl, U, V = cv.window(cx - head_a, cx + head_a, cy - 3 - head_b, eye_y + 23)
    head = cv.coverage(_ellipse_sd(U, V, cx, cy - 3, head_a, head_b))
    t = (U - cx - parting) / a
    hairline = eye_y - forehead + hair_curve * t ** 2
    if style == "fringe":
        hairline = hairline + 0.45 * forehead * np.clip(1 - t ** 2, 0, 1)
    below = V - hairline
    if style == "long":  # side locks in front of the ears
        below = np.minimum(below, np.where(np.abs(U - cx) > 0.78 * a, V - (eye_y + 22), 1e3))
    cover = head * cv.coverage(below)
    if style == "bald":  # a fringe of hair over the ears only
        cover = cover * np.clip((np.abs(U - cx) - 0.72 * a) * cv.scale, 0, 1) * np.clip((V - eye_y + 28) * cv.scale, 0, 1)
    cv.paint(sl, cover, hair_colour(U, V))

    # Beard (under the lips): moustache, chin or full.
    density, kind = p.beard
    if density > 0:
        nose_y, mouth_y = lm[2, 1], lm[3:, 1].mean()
        sl, U, V = cv.window(cx - a, cx + a, nose_y, cy + b + 2)
        x, y = np.abs(U - cx) / a, (V - cy) / b
        inside = cv.coverage((np.power(x ** chin + np.abs(y) ** chin, 1.0 / chin) - 1.0) * min(a, b))
        moustache = cv.coverage(np.maximum(np.abs(U - cx) - (lm[4, 0] - lm[3, 0]) / 2 - 2.5,
                                           np.abs(V - (nose_y + mouth_y) / 2 - 0.5) - 3.0))
        chin_part = cv.coverage(mouth_y + 4 - V) * cv.coverage(np.abs(U - cx) - 0.55 * a)
        full = cv.coverage(nose_y + 9 - V)
        region = (moustache, np.maximum(moustache, chin_part), np.maximum(moustache, full))[int(kind)]
        grain = 0.8 + 0.2 * np.sin(3.1 * U) * np.sin(2.3 * V)
        cv.paint(sl, density * inside * region * grain, p.hair_colour * 0.9)

    # Eyes: shadow, sclera, iris, pupil, upper lid.
    half_w, half_h, tilt, iris_f = p.eye
    for side, (ex, ey) in zip((-1, 1), lm[:2]):
        ang = side * tilt
        cv.ellipse(ex, ey, half_w * 1.5, half_h * 2.2, p.skin * 0.85, angle=ang, opacity=0.5)
        sl, U, V = cv.window(ex - half_w - 1, ex + half_w + 1, ey - half_h - 1, ey + half_h + 1)
        sclera_sd = _ellipse_sd(U, V, ex, ey, half_w, half_h, ang)
        sclera = cv.coverage(sclera_sd)
        cv.paint(sl, sclera, (232, 228, 222))
        iris_sd = np.sqrt((U - ex) ** 2 + (V - ey) ** 2) - iris_f * half_h * 1.25
        cv.paint(sl, sclera * cv.coverage(iris_sd), p.iris_colour)
        cv.paint(sl, sclera * cv.coverage(iris_sd + 0.55 * iris_f * half_h * 1.25), (12, 10, 10))
        lid = cv.coverage(np.abs(sclera_sd) - 0.45) * (V < ey + 0.3 * half_h)
        cv.paint(sl, lid, p.brow_colour * 0.5)

    # Brows: arched, tilted bars above the eyes.
    height, length, thick, angle, arch, inner = p.brow
    for side, (ex, ey) in zip((-1, 1), lm[:2]):
        bx, by = ex + side * inner, ey - height
        sl, U, V = cv.window(bx - length - 2, bx + length + 2, by - length, by + length)
        c, s = math.cos(math.radians(side * angle)), math.sin(math.radians(side * angle))
        x = (U - bx) * c + (V - by) * s
        y = (V - by) * c - (U - bx) * s + arch * (1 - (x / length) ** 2)
        cv.paint(sl, cv.coverage((np.sqrt((x / length) ** 2 + (y / thick) ** 2) - 1) * thick), p.brow_colour)

    # Nose: bridge shadow, tip highlight, nostrils.
    nx, ny = lm[2]
    nostril, nostril_size, bridge_side, tip = p.nose
    cv.ellipse(nx + bridge_side * (nostril * 0.8), ny - 8, 1.4, 9, p.skin * 0.8, opacity=0.55)
    cv.ellipse(nx, ny - 1, tip, tip * 0.8, np.minimum(p.skin * 1.12, 255), opacity=0.5)
    cv.ellipse(nx, ny + 2.5, nostril + 2, 1.8, p.skin * 0.82, opacity=0.5)
    for side in (-1, 1):
        cv.ellipse(nx + side * nostril, ny + 1.8, 1.9 * nostril_size, 1.1 * nostril_size, p.skin * 0.4,
                   angle=side * 15, opacity=0.9)

    # Mouth: lips between the mouth corners, with a dark line between them.
    (lx, ly), (rx, ry) = lm[3], lm[4]
    upper, lower, curve = p.mouth
    mx, my = (lx + rx) / 2, (ly + ry) / 2
    half = max(np.hypot(rx - lx, ry - ly) / 2, 1.0)
    c, s = (rx - lx) / (2 * half), (ry - ly) / (2 * half)
    sl, U, V = cv.window(mx - half - 2, mx + half + 2, my - upper - 4, my + lower + abs(curve) + 4)
    x = ((U - mx) * c + (V - my) * s) / half
    y = (V - my) * c - (U - mx) * s
    span = np.sqrt(np.clip(1 - x ** 2, 0, 1))
    line = curve * (1 - x ** 2)
    lips = np.maximum(np.abs(x) - 1, np.maximum(line - upper * span - y, y - line - lower * span)) * half / 4
    cv.paint(sl, cv.coverage(lips), p.lip_colour)
    cv.paint(sl, cv.coverage(np.maximum(np.abs(y - line) - 0.45, (np.abs(x) - 1) * half)), p.lip_colour * 0.45)

    # Glasses: rings around the eyes and a bridge.
    on, grey, frame = p.glasses
    if on:
        for ex, ey in lm[:2]:
            sl, U, V = cv.window(ex - 12, ex + 12, ey - 10, ey + 10)
            cv.paint(sl, cv.coverage(np.abs(_ellipse_sd(U, V, ex, ey, half_w + 4.5, half_h + 4.5)) - frame / 2), (grey,) * 3)
        (ax, ay), (bx2, by2) = lm[0], lm[1]
        sl, U, V = cv.window(ax, bx2, min(ay, by2) - 3, max(ay, by2) + 3)
        cv.paint(sl, cv.coverage(np.maximum(np.abs(V - (ay + by2) / 2 + 1) - frame / 2,
                                            np.abs(U - (ax + bx2) / 2) - (bx2 - ax) / 2 + half_w + 4)), (grey,) * 3)

    for mu, mv, mr in p.moles:
        cv.ellipse(mu, mv, mr, mr, p.skin * 0.5, opacity=0.85)

    return cv.rgba


# ----------------------------------------------------------------------------------------------
# Per-image variation and rendering
# ----------------------------------------------------------------------------------------------

def sample_variation(rng: np.random.Generator, profile: VariationProfile) -> dict:
    """One image's pose, expression, photometry and occluder, as plain numbers."""
    pr = profile
    return {
        "rotation": rng.normal(0, pr.rotation),
        "scale": math.exp(rng.normal(0, pr.log_scale)),
        "shift": rng.normal(0, pr.shift, 2),
        "yaw": rng.choice([-1.0, 1.0]) * rng.uniform(*pr.yaw),
        "pitch": rng.uniform(-pr.pitch, pr.pitch),
        "smile": rng.uniform(-pr.expression, pr.expression),
        "gain": rng.uniform(*pr.gain),
        "cast": 1 + rng.normal(0, pr.cast, 3),
        "gradient": rng.uniform(0, pr.gradient),
        "gradient_angle": rng.uniform(0, 2 * np.pi),
        "gamma": math.exp(rng.normal(0, pr.gamma)),
        "blur": rng.uniform(*pr.blur),
        "lowres": rng.uniform(1.5, 3.0) if rng.random() < pr.lowres else 1.0,
        "noise": rng.uniform(*pr.noise),
        "occluder": int(rng.integers(len(OCCLUDERS))) if rng.random() < pr.occlusion else -1,
        "background_seed": int(rng.integers(2 ** 63)),
        "occluder_seed": int(rng.integers(2 ** 63)),
        "noise_seed": int(rng.integers(2 ** 63)),
    }


def jitter_variation(var: dict, rng: np.random.Generator, amount: float = 1.0) -> dict:
    """A near-copy of `var`: the same scene re-shot (tiny pose/light change, new sensor noise)."""
    out = dict(var)
    out["rotation"] = var["rotation"] + rng.normal(0, 0.4 * amount)
    out["shift"] = var["shift"] + rng.normal(0, 0.4 * amount, 2)
    out["yaw"] = float(np.clip(var["yaw"] + rng.normal(0, 0.03 * amount), -1, 1))
    out["smile"] = var["smile"] + rng.normal(0, 0.05 * amount)
    out["gain"] = var["gain"] * (1 + rng.normal(0, 0.015 * amount))
    out["noise_seed"] = int(rng.integers(2 ** 63))
    return out


def _displacement(u, v, var, p: FaceParams):
    """Forward pose/expression displacement (units) at canonical points (u, v)."""
    g = np.exp(-(((u - FACE_CENTRE[0]) / 22.0) ** 2 + ((v - FACE_CENTRE[1]) / 28.0) ** 2) / 2)
    mx, my = p.landmarks[3:].mean(0)
    half = (p.landmarks[4, 0] - p.landmarks[3, 0]) / 2
    gm = np.exp(-(((u - mx) / 12.0) ** 2 + ((v - my) / 8.0) ** 2) / 2)
    du = var["yaw"] * YAW_SHIFT * g
    dv = var["pitch"] * PITCH_SHIFT * g - var["smile"] * 2.2 * gm * np.minimum(((u - mx) / half) ** 2, 1.5)
    return du, dv


def pose_matrix(var: dict, px_per_unit: float, centre_px) -> np.ndarray:
    """2x3 affine from canonical units to output pixels: similarity jitter and a yaw squeeze about the face centre."""
    r = math.radians(var["rotation"])
    rot = np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])
    squeeze = np.diag([1 - 0.18 * abs(var["yaw"]), 1.0])
    lin = px_per_unit * var["scale"] * rot @ squeeze
    t = np.asarray(centre_px, np.float64) + px_per_unit * np.asarray(var["shift"]) - lin @ FACE_CENTRE
    return np.hstack([lin, t[:, None]])


def aligned_matrix(var: dict, size: int) -> np.ndarray:
    """Pose matrix of an aligned (ArcFace-frame) image of `size` pixels."""
    k = size / 112.0
    return pose_matrix(var, k, FACE_CENTRE * k)


def image_landmarks(p: FaceParams, var: dict, M: np.ndarray) -> np.ndarray:
    """Where the five landmarks of `p` land in an image rendered with `var` and `M` (5, 2) pixels."""
    du, dv = _displacement(p.landmarks[:, 0], p.landmarks[:, 1], var, p)
    pts = p.landmarks + np.stack([du, dv], 1)
    return pts @ M[:, :2].T + M[:, 2]


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    return np.random.default_rng(20250515).standard_normal(1 << 21, dtype=np.float32)


def _sensor_noise(seed: int, shape) -> np.ndarray:
    """Unit Gaussian noise of `shape`: a window of a fixed bank at a seeded offset (drawing fresh noise
    for every image costs more than the rest of its rendering)."""
    bank = _noise_bank()
    n = int(np.prod(shape))
    if n > bank.size // 2:
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    offset = seed % (bank.size - n)
    return bank[offset:offset + n].reshape(shape)


def _background(seed: int, h: int, w: int) -> np.ndarray:
    """A muted, smooth, random scene with a few out-of-focus boxes, drawn at 1/4 size and upscaled."""
    rng = np.random.default_rng(seed)
    sh, sw = max(4, h // 4), max(4, w // 4)
    grey = rng.uniform(25, 230)
    base = grey + rng.uniform(0.1, 0.5) * (rng.uniform(25, 230, 3) - grey)  # mostly muted colours
    img = _smooth_field(base + rng.normal(0, 25, (3, 3, 3)), sh, sw)
    for _ in range(rng.integers(0, 4)):
        y0, x0 = rng.integers(0, sh), rng.integers(0, sw)
        y1, x1 = y0 + rng.integers(sh // 8 + 1, sh // 2 + 2), x0 + rng.integers(sw // 8 + 1, sw // 2 + 2)
        img[y0:y1, x0:x1] = rng.uniform(20, 235, 3)
    return cv2.resize(np.clip(img, 0, 255), (w, h), interpolation=cv2.INTER_LINEAR)


def _draw_occluder(img, var, p: FaceParams, M):
    """Paint the image's occluder (in place) where the face is, using a uint8 anti-aliased mask."""
    rng = np.random.default_rng(var["occluder_seed"])
    h, w = img.shape[:2]
    kind = OCCLUDERS[var["occluder"]]
    lm = p.landmarks
    cx, cy, a, b = p.face[:4]
    k = math.sqrt(abs(np.linalg.det(M[:, :2])))
    mask = np.zeros((h, w), np.uint8)

    def to_px(points):
        du, dv = _displacement(points[:, 0], points[:, 1], var, p)
        pts = (points + np.stack([du, dv], 1)) @ M[:, :2].T + M[:, 2]
        return np.round(pts * 16).astype(np.int32)  # 4 fractional bits for cv2's shift=4

    angle = math.degrees(math.atan2(M[1, 0], M[0, 0]))
    if kind == "sunglasses":
        colour = rng.uniform(10, 60, 3)
        for c in to_px(lm[:2]):
            cv2.ellipse(mask, tuple(int(x) for x in c), (int(9.5 * k * 16), int(6.5 * k * 16)), angle, 0, 360, 255,
                        -1, cv2.LINE_AA, 4)
        ends = to_px(lm[:2])
        cv2.line(mask, tuple(int(x) for x in ends[0]), tuple(int(x) for x in ends[1]), 255,
                 max(1, int(2 * k)), cv2.LINE_AA, 4)
    elif kind == "mask":
        colour = rng.choice([[225, 230, 235], [120, 160, 210], [40, 40, 45]]) + rng.normal(0, 8, 3)
        ny = lm[2, 1] - 3
        poly = np.array([[cx - 0.95 * a, ny], [cx + 0.95 * a, ny], [cx + 0.8 * a, cy + 0.75 * b], [cx, cy + 1.03 * b],
                         [cx - 0.8 * a, cy + 0.75 * b]])
        cv2.fillPoly(mask, [to_px(poly)], 255, cv2.LINE_AA, 4)
    elif kind == "hat":
        colour = rng.uniform(15, 240, 3)
        brim = lm[:2, 1].mean() - rng.uniform(14, 24)
        poly = np.array([[cx - 1.5 * a, brim], [cx + 1.5 * a, brim], [cx + 1.2 * a, CANVAS_MIN], [cx - 1.2 * a, CANVAS_MIN]])
        cv2.fillPoly(mask, [to_px(poly)], 255, cv2.LINE_AA, 4)
    else:  # an object (hand, cup, microphone) in front of part of the face
        colour = rng.uniform(20, 235, 3)
        centre = np.array([[cx + rng.uniform(-0.8, 0.8) * a, cy + rng.uniform(-0.6, 0.9) * b]])
        axes = (int(rng.uniform(10, 24) * k * 16), int(rng.uniform(8, 20) * k * 16))
        cv2.ellipse(mask, tuple(int(x) for x in to_px(centre)[0]), axes, rng.uniform(0, 180), 0, 360, 255,
                    -1, cv2.LINE_AA, 4)
    m = mask.astype(np.float32)[..., None] / 255.0
    shade = 1 + 0.08 * _smooth_field(rng.normal(0, 1, (4, 4)), h, w)[..., None]
    img *= 1 - m
    img += m * np.asarray(colour, np.float32) * shade


def render_image(base: np.ndarray, scale: float, p: FaceParams, var: dict, M: np.ndarray, out_hw) -> np.ndarray:
    """Render identity `p` (painted as `base` at `scale` px/unit) with variation `var` through pose matrix `M`.

    Returns an RGB uint8 image of shape out_hw + (3,).
    """
    h, w = out_hw
    Minv = cv2.invertAffineTransform(M).astype(np.float32)  # float32 scalars keep the maps float32
    xs = np.arange(w, dtype=np.float32)[None, :]
    ys = np.arange(h, dtype=np.float32)[:, None]
    # Where each output pixel comes from in canonical units: the inverse affine, then the inverse of the
    # smooth pose displacement, solved on a grid 4x coarser (where cv2.resize puts its samples) and upsampled.
    cw, ch = max(2, -(-w // 4)), max(2, -(-h // 4))
    cx = ((np.arange(cw, dtype=np.float32) + 0.5) * w / cw - 0.5)[None, :]
    cy = ((np.arange(ch, dtype=np.float32) + 0.5) * h / ch - 0.5)[:, None]
    qu = Minv[0, 0] * cx + Minv[0, 1] * cy + Minv[0, 2]
    qv = Minv[1, 0] * cx + Minv[1, 1] * cy + Minv[1, 2]
    du = dv = 0.0
    for _ in range(3):  # p + D(p) = q by fixed-point iteration (D is a gentle field)
        du, dv = _displacement(qu - du, qv - dv, var, p)
    du = cv2.resize(np.broadcast_to(du, (ch, cw)).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    dv = cv2.resize(np.broadcast_to(dv, (ch, cw)).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    map_u = (Minv[0, 0] * xs + Minv[0, 1] * ys + (Minv[0, 2] - CANVAS_MIN) - du) * scale
    map_v = (Minv[1, 0] * xs + Minv[1, 1] * ys + (Minv[1, 2] - CANVAS_MIN) - dv) * scale
    face = cv2.remap(base, map_u.astype(np.float32), map_v.astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
    img = face[..., :3] + _background(var["background_seed"], h, w) * (1 - face[..., 3:])
    if var["occluder"] >= 0:
        _draw_occluder(img, var, p, M)

    # Illumination: gain, colour cast, a linear gradient (side light), then gamma (a lookup table).
    d = (xs - w / 2) * math.cos(var["gradient_angle"]) + (ys - h / 2) * math.sin(var["gradient_angle"])
    light = np.maximum(1 + var["gradient"] * d / (max(h, w) / 2), 0.2) * var["gain"]
    img *= light[..., None]
    img *= np.asarray(var["cast"], np.float32)
    gamma = np.clip(255.0 * (np.arange(256) / 255.0) ** var["gamma"] + 0.5, 0, 255).astype(np.uint8)
    img = cv2.LUT(np.clip(img + 0.5, 0, 255).astype(np.uint8), gamma)

    k = math.sqrt(abs(np.linalg.det(M[:, :2])))  # output pixels per canonical unit
    if var["lowres"] > 1:
        small = (max(4, round(w / var["lowres"])), max(4, round(h / var["lowres"])))
        img = cv2.resize(cv2.resize(img, small, interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_LINEAR)
    if var["blur"] * k > 0.25:
        img = cv2.GaussianBlur(img, (0, 0), var["blur"] * k)
    if var["noise"] > 0:
        img = np.clip(img + _sensor_noise(var["noise_seed"], img.shape) * var["noise"] + 0.5, 0, 255).astype(np.uint8)
    return img


def paint_scale(image_size: int) -> float:
    """Painting resolution (px per canonical unit) for images of `image_size`: 1.5x oversampled."""
    return 1.5 * image_size / 112.0


@lru_cache(maxsize=16)  # jobs are grouped by identity (see generate_dataset); a painting is ~1 MB at 112 px
def identity_render(cfg: SyntheticConfig, uid: int):
    """(FaceParams, painted RGBA, scale) of identity `uid`, cached per process."""
    p = sample_identity(cfg, uid)
    scale = paint_scale(cfg.image_size)
    return p, paint_identity(p, scale), scale


def render_aligned(cfg: SyntheticConfig, uid: int, var: dict) -> np.ndarray:
    """An aligned (ArcFace-frame) image of identity `uid`, cfg.image_size square, RGB uint8."""
    p, base, scale = identity_render(cfg, uid)
    M = aligned_matrix(var, cfg.image_size)
    return render_image(base, scale, p, var, M, (cfg.image_size, cfg.image_size))


# ----------------------------------------------------------------------------------------------
# Planning: who is in which image (vectorised, in the main process)
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainingPlan:
    """The training set before rendering; every array is indexed by sample index (key - 1)."""
    counts: np.ndarray       # (num_ids,) images per label
    labels: np.ndarray       # (N,) given label
    source_uid: np.ndarray   # (N,) identity the image is rendered from (== label when clean)
    flipped: np.ndarray      # sorted sample indices rendered from another in-set identity
    open_set: np.ndarray     # sorted sample indices rendered from an identity outside the label set
    dup_source: np.ndarray   # (N,) sample index whose scene the image re-shoots, -1 if none
    redundant_ids: np.ndarray  # sorted labels of the identities that may hold re-shoots
    dup_probability: float   # probability that a clean image of a redundant identity re-shoots

    @property
    def num_images(self) -> int:
        return int(self.labels.size)


def _rank_within_groups(groups: np.ndarray, group_starts: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements share its group (groups hold contiguous-label counts)."""
    order = np.argsort(groups, kind="stable")
    rank = np.empty(groups.size, np.int64)
    rank[order] = np.arange(groups.size) - group_starts[groups[order]]
    return rank


def plan_training_set(cfg: SyntheticConfig) -> TrainingPlan:
    """Identity sizes (log-normal, clipped), label noise and near-duplicate groups."""
    rng = _rng(cfg.seed, "plan")
    sizes = rng.lognormal(math.log(cfg.median_images), 0.9, cfg.num_ids)
    counts = np.clip(np.rint(sizes), cfg.min_images, cfg.max_images).astype(np.int64)
    labels = np.repeat(np.arange(cfg.num_ids, dtype=np.int64), counts)
    n = labels.size
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

    # Noise: random images, at most (count - 1) // 2 per identity so the labelled identity stays the majority.
    n_flip, n_open = round(cfg.flip_rate * n), round(cfg.open_rate * n)
    perm = rng.permutation(n)
    eligible = perm[_rank_within_groups(labels[perm], starts) < (counts[labels[perm]] - 1) // 2]
    if eligible.size < n_flip + n_open:
        raise ValueError(f"cannot place {n_flip + n_open} noisy images among {n} (at most (count-1)//2 per identity); "
                         f"lower flip_rate/open_rate or raise min_images")
    flipped = np.sort(eligible[:n_flip])
    open_set = np.sort(eligible[n_flip:n_flip + n_open])
    source_uid = labels.copy()
    source_uid[flipped] = (labels[flipped] + rng.integers(1, cfg.num_ids, flipped.size)) % cfg.num_ids
    source_uid[open_set] = cfg.open_uid0 + rng.integers(0, cfg.num_open_ids, open_set.size)

    # Near-duplicates (redundancy): in the redundant identities (a share `redundant_id_share` of them),
    # each clean image re-shoots the nearest earlier clean original of its identity with probability p,
    # p chosen so that `redundancy` is the expected share of all images; with every identity redundant,
    # p = redundancy, the share of each identity's images. An identity's first clean image and the noisy
    # images are never re-shoots, so the realised share is a little lower (see redundancy.json).
    clean = source_uid == labels
    redundant = rng.random(cfg.num_ids) < cfg.redundant_id_share
    share = counts[redundant].sum() / n
    p_dup = min(MAX_DUP_SHARE, cfg.redundancy / share) if share > 0 else 0.0
    is_dup = clean & redundant[labels] & (rng.random(n) < p_dup)
    original = np.maximum.accumulate(np.where(clean & ~is_dup, np.arange(n), -1))
    is_dup &= (original >= 0) & (labels[np.maximum(original, 0)] == labels)
    dup_source = np.where(is_dup, original, -1)
    return TrainingPlan(counts, labels, source_uid, flipped, open_set, dup_source, np.flatnonzero(redundant), p_dup)


@dataclass
class PairPlan:
    """One verification set: a pool of rendered images of the held-out identities, and the pairs.

    As in LFW, an image may appear in several pairs; the .bin still holds two images per pair.
    """
    pool_uid: np.ndarray     # (M,) identity of pool image k; identities in order, val_images_per_id each
    position: np.ndarray     # (4P,) pool image at .bin position 2i, 2i+1 of pair i
    issame: np.ndarray       # (2P,) bool

    @property
    def used(self) -> np.ndarray:
        """The pool images some pair holds, sorted (the ones rendered)."""
        return np.unique(self.position)


def val_images_per_id(cfg: SyntheticConfig) -> int:
    """Pool images per held-out identity: about two pairs per image, and at least 4 (6 genuine pairs)."""
    return max(4, math.ceil(2 * cfg.val_pairs / max(cfg.num_val_ids, 1)))


def plan_pairs(cfg: SyntheticConfig, bin_no: int) -> PairPlan:
    """Verification set `bin_no`: P genuine and P impostor pairs, P = cfg.val_pairs, in random order.

    Genuine pairs are spread evenly over the held-out identities, each two distinct images, no pair twice.
    Impostor pairs join two different identities, one image of each (no pair twice where the identities
    allow); half of them join two identities of the same family (shared colouring and face shape) when
    the held-out identities hold such pairs: the hard negatives. Pool images that no pair uses are not
    rendered.
    """
    rng = _rng(cfg.seed, "pairs", bin_no)
    P, V, m = cfg.val_pairs, cfg.num_val_ids, val_images_per_id(cfg)
    uids = np.arange(cfg.val_uid0, cfg.val_uid0 + V)
    first_image = np.arange(V) * m

    # Genuine: identity of each pair (balanced), then per identity distinct image pairs (a < b), taken
    # as the first ones of a random order of all its m (m - 1) / 2 pairs; m >= 2 P / V makes enough.
    owner = rng.permutation(np.arange(P) % V)
    per_owner = np.bincount(owner, minlength=V)
    a_img, b_img = np.triu_indices(m, 1)
    order = np.argsort(rng.random((V, a_img.size)), axis=1)[:, :max(per_owner.max(initial=0), 1)]
    rank = _rank_within_groups(owner, np.r_[0, np.cumsum(per_owner)[:-1]])
    combo = order[owner, rank]
    genuine = first_image[owner, None] + np.stack([a_img[combo], b_img[combo]], 1)

    # Impostor: two different identities (half of them from one family), a random image of each.
    family = np.array([sample_identity(cfg, u).family for u in uids])
    a_id, b_id = np.triu_indices(V, 1)
    kin = np.flatnonzero(family[a_id] == family[b_id])
    first = rng.integers(0, V, P)
    second = (first + rng.integers(1, V, P)) % V
    if kin.size:
        hard = rng.choice(kin, P // 2)
        first[: P // 2], second[: P // 2] = a_id[hard], b_id[hard]
    impostor = np.stack([first, second], 1) * m + rng.integers(0, m, (P, 2))
    for _ in range(100):  # draw the images of a repeated pair again (a few of thousands)
        key = impostor.min(1) * V * m + impostor.max(1)
        again = np.setdiff1d(np.arange(P), np.unique(key, return_index=True)[1])
        if not again.size:
            break
        impostor[again] = np.stack([first[again], second[again]], 1) * m + rng.integers(0, m, (again.size, 2))

    pairs = np.concatenate([genuine, impostor])
    issame = np.concatenate([np.ones(P, bool), np.zeros(P, bool)])
    shuffle = rng.permutation(2 * P)
    return PairPlan(pool_uid=np.repeat(uids, m), position=pairs[shuffle].reshape(-1), issame=issame[shuffle])


@dataclass
class IJBPlan:
    """Images of the IJB-style set; one row per image unless stated."""
    uid: np.ndarray          # identity rendered
    template: np.ndarray     # template id (1-based)
    media: np.ndarray        # media id (1-based); frames of a video share it
    frame: np.ndarray        # frame number within its media (0: the media's first image)
    template_subject: np.ndarray  # (T,) subject id (1-based) of template t+1
    target: str = "ijbc"


def _ijb_rng(cfg: SyntheticConfig, target: str, kind: str, *keys: int) -> np.random.Generator:
    """The generator of `kind` (plan, image, frame, detector) for IJB target `target`."""
    return _rng(cfg.seed, f"{IJB_TARGETS[target]['stream']}_{kind}", *keys)


def plan_ijb(cfg: SyntheticConfig, target: str = "ijbc") -> IJBPlan:
    """Templates of 1-3 media, a media being a still image or 2-4 frames of a video; the subjects of
    each target are their own held-out identities (cfg.ijb_uid_range)."""
    rng = _ijb_rng(cfg, target, "plan")
    n, T = cfg.ijb_ids, cfg.ijb_templates
    per_subject = 2 + rng.multinomial(T - 2 * n, np.full(n, 1.0 / n)) if n else np.zeros(0, np.int64)
    template_subject = np.repeat(np.arange(1, n + 1), per_subject)
    media_per_template = 1 + rng.binomial(2, 0.35, T)
    media_template = np.repeat(np.arange(1, T + 1), media_per_template)
    is_video = rng.random(media_template.size) < 0.4
    frames = np.where(is_video, rng.integers(2, 5, media_template.size), 1)
    media = np.repeat(np.arange(1, media_template.size + 1), frames)
    first = np.concatenate([[0], np.cumsum(frames)[:-1]])
    frame = np.arange(media.size) - np.repeat(first, frames)
    template = media_template[media - 1]
    uid = cfg.ijb_uid_range(target)[0] + template_subject[template - 1] - 1
    return IJBPlan(uid=uid, template=template, media=media, frame=frame, template_subject=template_subject,
                   target=target)


def ijb_template_pairs(cfg: SyntheticConfig, template_subject: np.ndarray, max_impostors: int = 50000,
                       target: str = "ijbc"):
    """(pairs (K, 2) of template ids, labels (K,)): every genuine pair and up to `max_impostors` impostor pairs."""
    a, b = np.triu_indices(template_subject.size, 1)
    same = template_subject[a] == template_subject[b]
    impostor = np.flatnonzero(~same)
    if impostor.size > max_impostors:
        impostor = np.sort(_ijb_rng(cfg, target, "plan", 1).choice(impostor, max_impostors, replace=False))
    keep = np.concatenate([np.flatnonzero(same), impostor])
    keep.sort()
    return np.stack([a[keep], b[keep]], 1) + 1, same[keep].astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Rendering jobs (run in worker processes; each image depends only on its own keys)
# ----------------------------------------------------------------------------------------------

def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {rgb.shape} image as JPEG")
    return buf.tobytes()


def training_variation(cfg: SyntheticConfig, index: int, dup_source: int) -> dict:
    """Variation of training sample `index`; a near-duplicate re-shoots its original's scene."""
    if dup_source < 0:
        return sample_variation(_rng(cfg.seed, "train", index), PROFILES["train"])
    var = sample_variation(_rng(cfg.seed, "train", dup_source), PROFILES["train"])
    return jitter_variation(var, _rng(cfg.seed, "train_dup", index))


def _render_training(cfg, indices, source_uid, dup_source):
    return [encode_jpeg(render_aligned(cfg, int(u), training_variation(cfg, int(i), int(d))))
            for i, u, d in zip(indices, source_uid, dup_source)]


def _render_pairs(cfg, pool_images, uids, bin_no, profile):
    return [encode_jpeg(render_aligned(cfg, int(u), sample_variation(_rng(cfg.seed, "pair_image", bin_no, int(k)),
                                                                      PROFILES[profile])))
            for k, u in zip(pool_images, uids)]


def ijb_image(cfg: SyntheticConfig, number: int, uid: int, media: int, frame: int, target: str = "ijbc"):
    """(RGB crop, (5, 2) true landmarks, (5, 2) detected landmarks, detector score) of image `number`
    (1-based within `target`) of IJB target `target`.

    The frames of a video share the media's scene and placement, re-shot with a small jitter.
    """
    rng = _ijb_rng(cfg, target, "image", media)
    var = sample_variation(rng, PROFILES["ijb"])
    k = cfg.image_size / 112.0 * rng.uniform(0.8, 1.15)
    crop = int(round(cfg.ijb_crop_scale * cfg.image_size))
    centre = crop / 2 + rng.uniform(-0.1, 0.1, 2) * crop
    if frame > 0:
        var = jitter_variation(var, _ijb_rng(cfg, target, "frame", number), amount=3.0)
    M = pose_matrix(var, k, centre)
    img, landmarks = render_loose_crop(cfg, uid, var, M, crop)
    det = _ijb_rng(cfg, target, "detector", number)
    detected = landmarks + det.normal(0, 0.4 * cfg.image_size / 112.0, landmarks.shape)
    score = 0.98 - 0.2 * abs(var["yaw"]) - 0.12 * (var["occluder"] >= 0) - 0.05 * var["blur"] + det.normal(0, 0.03)
    return img, landmarks, detected, float(np.clip(score, 0.6, 1.0))


def render_loose_crop(cfg: SyntheticConfig, uid: int, var: dict, M: np.ndarray, crop: int):
    """(RGB uint8 crop, (5, 2) landmarks in crop pixels) of identity `uid` rendered through `M`."""
    p, base, scale = identity_render(cfg, uid)
    return render_image(base, scale, p, var, M, (crop, crop)), image_landmarks(p, var, M)


def _render_ijb(cfg, numbers, uids, media, frames, target):
    out = []
    for number, u, m, f in zip(numbers, uids, media, frames):
        img, _, detected, score = ijb_image(cfg, int(number), int(u), int(m), int(f), target)
        out.append((encode_jpeg(img), detected, score))
    return out


def _run_job(job):
    fn, args = job
    return fn(*args)


def _worker_init():
    cv2.setNumThreads(1)  # processes, not threads, share the cores


def _chunks(n: int, size: int):
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _identity_chunks(counts: np.ndarray, size: int):
    """(start, end) sample ranges of about `size` images that never split an identity, so that a
    worker paints each identity once."""
    ends = np.cumsum(counts)
    block = (ends - 1) // size
    bounds = np.r_[0, ends[np.r_[block[1:] != block[:-1], True]]]
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


# ----------------------------------------------------------------------------------------------
# Writing the dataset folder
# ----------------------------------------------------------------------------------------------

def _write_lines(path, lines):
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def _write_training_set(out, cfg, plan, jpegs):
    """train.rec/.idx/property in the InsightFace layout from the iterable `jpegs` (sample order)."""
    n = plan.num_images
    first_id_key = n + 1
    ends = np.cumsum(plan.counts) + 1
    ranges = np.stack([ends - plan.counts, ends], 1)
    with recordio.MXIndexedRecordIO(os.path.join(out, "train.idx"), os.path.join(out, "train.rec"), "w") as rec:
        rec.write_idx(0, recordio.pack(recordio.IRHeader(2, [first_id_key, first_id_key + cfg.num_ids], 0, 0), b""))
        for key, jpeg in enumerate(jpegs, start=1):
            rec.write_idx(key, recordio.pack(recordio.IRHeader(0, float(plan.labels[key - 1]), key, 0), jpeg))
        for label, (start, end) in enumerate(ranges):
            rec.write_idx(first_id_key + label, recordio.pack(recordio.IRHeader(2, [start, end], 0, 0), b""))
    with open(os.path.join(out, "property"), "w") as f:
        f.write(f"{cfg.num_ids},{cfg.image_size},{cfg.image_size}\n")


def _noise_record(cfg, plan):
    truth = plan.source_uid.copy()
    truth[plan.open_set] = -1  # an identity outside the label set: no true label among the classes
    return noise_record(plan.labels, truth, cfg.flip_rate, cfg.open_rate, cfg.seed, cfg.num_ids)


def _write_ijb(out, cfg, ijb: IJBPlan, results, first_number: int):
    """ijb/loose_crop/<n>.jpg (n from `first_number`) and the meta files of target `ijb.target`, in its real
    release's naming (1:N galleries G1/G2 for IJB-C, S1/S2 for IJB-B); returns a summary."""
    crops = os.path.join(out, "ijb", "loose_crop")
    meta = os.path.join(out, "ijb", "meta")
    os.makedirs(crops, exist_ok=True)
    os.makedirs(meta, exist_ok=True)
    names = [f"{n}.jpg" for n in range(first_number, first_number + ijb.uid.size)]
    five = []
    number = 0
    for batch in results:
        for jpeg, landmarks, score in batch:
            with open(os.path.join(crops, names[number]), "wb") as f:
                f.write(jpeg)
            five.append(f"{names[number]} " + " ".join(f"{x:.3f}" for x in landmarks.reshape(-1)) + f" {score:.4f}")
            number += 1
    t = ijb.target
    _write_lines(os.path.join(meta, f"{t}_name_5pts_score.txt"), five)
    _write_lines(os.path.join(meta, f"{t}_face_tid_mid.txt"),
                 [f"{nm} {tid} {mid}" for nm, tid, mid in zip(names, ijb.template, ijb.media)])
    pairs, labels = ijb_template_pairs(cfg, ijb.template_subject, target=t)
    _write_lines(os.path.join(meta, f"{t}_template_pair_label.txt"),
                 [f"{a} {b} {lab}" for (a, b), lab in zip(pairs, labels)])

    # 1:N: each subject's first template is its gallery template, in the first or the second gallery
    # (disjoint halves); every other template is a probe.
    subjects = np.unique(ijb.template_subject)
    in_g1 = np.zeros(subjects.max() + 1 if subjects.size else 1, bool)
    in_g1[_ijb_rng(cfg, t, "plan", 2).permutation(subjects)[: subjects.size // 2]] = True
    tids = np.arange(1, ijb.template_subject.size + 1)
    first_of_subject = np.r_[True, ijb.template_subject[1:] != ijb.template_subject[:-1]]
    g1, g2 = IJB_TARGETS[t]["galleries"]
    sets = {
        f"{t}_1N_gallery_{g1}.csv": first_of_subject & in_g1[ijb.template_subject],
        f"{t}_1N_gallery_{g2}.csv": first_of_subject & ~in_g1[ijb.template_subject],
        f"{t}_1N_probe_mixed.csv": ~first_of_subject,
    }
    for filename, chosen in sets.items():
        rows = [f"{tid},{ijb.template_subject[tid - 1]},{names[i]}"
                for tid in tids[chosen] for i in np.flatnonzero(ijb.template == tid)]
        _write_lines(os.path.join(meta, filename), ["TEMPLATE_ID,SUBJECT_ID,FILENAME"] + rows)
    return {"subjects": int(subjects.size), "templates": int(tids.size), "media": int(ijb.media.max(initial=0)),
            "images": int(ijb.uid.size), "image_names": [names[0], names[-1]] if names else [],
            "genuine_pairs": int(labels.sum()), "impostor_pairs": int(labels.size - labels.sum()),
            "crop_size": int(round(cfg.ijb_crop_scale * cfg.image_size))}


def _prepare_out_dir(out: str, overwrite: bool) -> str:
    """A fresh hidden folder beside `out` to write into; refuses a non-empty `out` unless `overwrite`."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise FileExistsError(f"{out} exists and is not a folder")
        if os.listdir(out) and not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}-{time.time_ns()}")
    os.mkdir(tmp)
    return tmp


def _move_into_place(tmp: str, out: str):
    out = os.path.abspath(out)
    old = None
    if os.path.exists(out):
        old = f"{tmp}.old"
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old)


def _job_groups(cfg, plan, pair_plans, ijb_plans) -> dict:
    """Rendering jobs by the file they end in: {group: [(function, (cfg, indices, ...)), ...]}.

    A job holds a few dozen images grouped by the identity they show, so that a worker paints an
    identity about once. The noisy training images (rendered from an identity other than their
    label) form their own group, sorted by that identity; the clean ones go in sample order.
    """
    noisy = np.r_[plan.flipped, plan.open_set]
    noisy = noisy[np.argsort(plan.source_uid[noisy], kind="stable")]
    is_clean = np.ones(plan.num_images, bool)
    is_clean[noisy] = False

    def train_job(idx):
        return _render_training, (cfg, idx, plan.source_uid[idx], plan.dup_source[idx])

    groups = {"train_noisy": [train_job(noisy[s:e]) for s, e in _chunks(noisy.size, 64)],
              "train": [train_job(np.arange(s, e)[is_clean[s:e]]) for s, e in _identity_chunks(plan.counts, 64)]}
    for b, pairs in enumerate(pair_plans):  # pool images are grouped by identity
        name = VERIFICATION_BINS[b]
        used = pairs.used
        groups[name] = [(_render_pairs, (cfg, used[s:e], pairs.pool_uid[used[s:e]], b, BIN_PROFILES[name]))
                        for s, e in _chunks(used.size, 64)]
    for ijb in ijb_plans:  # templates, hence images, are already grouped by subject
        numbers = np.arange(1, ijb.uid.size + 1)
        groups[f"ijb_{ijb.target}"] = [
            (_render_ijb, (cfg, numbers[s:e], ijb.uid[s:e], ijb.media[s:e], ijb.frame[s:e], ijb.target))
            for s, e in _chunks(ijb.uid.size, 16)]
    return groups


def _in_sample_order(noisy, clean, num_images):
    """Every training JPEG in sample order from (indices, JPEGs) batches: all of `noisy` (held in
    memory), then `clean` in increasing index order, the noisy ones slotted into their places."""
    waiting = {int(i): jpeg for idx, batch in noisy for i, jpeg in zip(idx, batch)}
    following = 0  # the sample index the record file needs next
    for idx, batch in clean:
        for i, jpeg in zip(idx.tolist(), batch):
            while following < i:
                yield waiting.pop(following)
                following += 1
            yield jpeg
            following = i + 1
    while following < num_images:
        yield waiting.pop(following)
        following += 1


def _redundancy_record(cfg, plan) -> dict:
    """The content of redundancy.json: the near-duplicate ground truth (sample indices)."""
    dup = np.flatnonzero(plan.dup_source >= 0)
    source = plan.dup_source[dup]
    n = plan.num_images
    return {
        "redundancy": cfg.redundancy, "redundant_id_share": cfg.redundant_id_share, "seed": cfg.seed,
        "num_images": n, "num_classes": cfg.num_ids,
        "redundant_identities": plan.redundant_ids.tolist(),
        "per_image_probability": float(plan.dup_probability),
        # sample `index[k]` re-shoots the scene of sample `source[k]` (an earlier clean image of its identity)
        "index": dup.tolist(), "source": source.tolist(),
        "share": dup.size / n if n else 0.0,
        # images with a near-identical twin (re-shoots and the originals they re-shoot): what a
        # nearest-neighbour statistic (utils/data/redundancy.py) finds
        "with_twin_share": np.union1d(dup, source).size / n if n else 0.0,
    }


def _description(cfg, plan, redundancy, bins, ijb_summaries) -> dict:
    """The content of dataset.json (`redundancy`: the content of redundancy.json)."""
    return {
        "generator": "utils/synthetic/generator.py",
        "config": dataclasses.asdict(cfg),
        "num_images": plan.num_images,
        "num_classes": cfg.num_ids,
        "image_size": [cfg.image_size, cfg.image_size],
        "identity_counts": plan.counts.tolist(),
        "redundancy": {k: redundancy[k] for k in ("redundancy", "redundant_id_share", "per_image_probability",
                                                   "share", "with_twin_share")}
                      | {"near_duplicates": len(redundancy["index"]), "ground_truth": "redundancy.json"},
        "held_out_uids": {
            "verification": [cfg.val_uid0, cfg.val_uid0 + cfg.num_val_ids],
            **{t: list(cfg.ijb_uid_range(t)) for t in IJB_TARGETS},
            "open_set": [cfg.open_uid0, cfg.open_uid0 + cfg.num_open_ids],
        },
        "verification": bins,
        "ijb": ijb_summaries,
        "profiles": {k: dataclasses.asdict(v) for k, v in PROFILES.items()},
    }


def generate_dataset(out_dir, cfg: SyntheticConfig, workers: int = 1, overwrite: bool = False,
                     progress: bool = True) -> dict:
    """Write the synthetic dataset folder `out_dir` (atomically: all of it or nothing); returns a summary.

    The files depend on `cfg` only: `workers` changes the speed, not a byte.
    """
    cfg.validate()
    t0 = time.time()
    tmp = _prepare_out_dir(out_dir, overwrite)
    # imported here: it pulls in torch, which a refused command line and the spawned render workers (which import
    # this module) need not wait for
    from utils.evaluation.verification import save_bin
    pool = None
    try:
        plan = plan_training_set(cfg)
        pair_plans = [plan_pairs(cfg, b) for b in range(len(VERIFICATION_BINS))] if cfg.val_pairs else []
        ijb_plans = [plan_ijb(cfg, t) for t in cfg.ijb_target_list] if cfg.ijb_templates else []
        groups = _job_groups(cfg, plan, pair_plans, ijb_plans)
        jobs = [job for group in groups.values() for job in group]
        if workers > 1:
            # spawn, not fork: a forked child inherits OpenCV's (and torch's) thread pools in whatever
            # state the parent left them, and can hang on its first cv2 call.
            pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init)
        results = pool.imap(_run_job, jobs) if pool else map(_run_job, jobs)  # in job order
        bar = tqdm(total=sum(len(args[1]) for _, args in jobs), unit="img", disable=not progress, desc="synthetic")

        def rendered(group):
            """(indices, JPEGs or IJB tuples) of `group`'s jobs; groups must be consumed in `groups` order."""
            for _, args in groups.get(group, ()):
                batch = next(results)
                bar.update(len(batch))
                yield args[1], batch

        _write_training_set(tmp, cfg, plan, _in_sample_order(rendered("train_noisy"), rendered("train"),
                                                             plan.num_images))
        bins = {}
        for b, pairs in enumerate(pair_plans):
            name = VERIFICATION_BINS[b]
            jpeg_of = dict(zip(pairs.used.tolist(), (jpeg for _, batch in rendered(name) for jpeg in batch)))
            # one bytes object per pool image: pickle stores an image once however many pairs hold it
            save_bin(os.path.join(tmp, f"{name}.bin"), [jpeg_of[k] for k in pairs.position.tolist()], pairs.issame)
            bins[name] = {"profile": BIN_PROFILES[name], "pairs": int(pairs.issame.size),
                          "genuine": int(pairs.issame.sum()), "images": len(jpeg_of)}
        ijb_summaries, first_number = {}, 1
        for ijb in ijb_plans:
            ijb_summaries[ijb.target] = _write_ijb(tmp, cfg, ijb, (batch for _, batch in rendered(f"ijb_{ijb.target}")),
                                                   first_number)
            first_number += ijb.uid.size
        bar.close()

        atomic_write_json(os.path.join(tmp, "noise.json"), _noise_record(cfg, plan))
        redundancy = _redundancy_record(cfg, plan)
        atomic_write_json(os.path.join(tmp, "redundancy.json"), redundancy)
        atomic_write_json(os.path.join(tmp, "dataset.json"), _description(cfg, plan, redundancy, bins, ijb_summaries))
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool:
            pool.terminate()
            pool.join()
    return {
        "out": os.path.abspath(out_dir), "images": plan.num_images, "identities": cfg.num_ids,
        "flipped": int(plan.flipped.size), "open_set": int(plan.open_set.size),
        "near_duplicates": int((plan.dup_source >= 0).sum()),
        "verification_pairs": {k: v["pairs"] for k, v in bins.items()},
        "ijb_images": {t: v["images"] for t, v in ijb_summaries.items()}, "seconds": round(time.time() - t0, 2),
    }


# ----------------------------------------------------------------------------------------------
# Command line (make_synthetic_dataset.py)
# ----------------------------------------------------------------------------------------------

CONFIG_HELP = {
    "num_ids": "identities in the label set (classes of train.rec)",
    "image_size": "side of the aligned square images in pixels (112 as InsightFace; 32-48 for fast CPU runs)",
    "seed": "random seed: the same seed and arguments give byte-identical files",
    "flip_rate": "share of training images rendered from another in-set identity (closed-set label flips)",
    "open_rate": "share of training images rendered from identities outside the label set (open-set outliers)",
    "redundancy": "expected share of training images that re-shoot an earlier image of their identity (near-"
                  "duplicates: one photo shoot, tiny pose/light/crop changes); spread over --redundant_id_share of "
                  "the identities, so with --redundant_id_share 1 it is the share of each identity's images",
    "redundant_id_share": "share of identities that hold re-shoots (0.3: the earlier datasets; 1: all identities)",
    "min_images": "fewest images of an identity (identity sizes are log-normal, clipped)",
    "max_images": "most images of an identity",
    "median_images": "median images per identity before clipping",
    "num_val_ids": "held-out identities of the verification .bin files",
    "val_pairs": "genuine pairs, and as many impostor pairs, in each verification .bin (3000: LFW's 6000 pairs; "
                 "0: no .bin)",
    "ijb_ids": "held-out subjects of each IJB target in ijb/ (the targets' subjects are disjoint)",
    "ijb_templates": "templates of each IJB target in ijb/ (>= 2 per subject; 0: no ijb/)",
    "ijb_targets": "IJB release layouts written under ijb/ (comma-separated: ijbc, ijbb); they share loose_crop/ "
                   "with disjoint images",
    "ijb_crop_scale": "side of an ijb loose crop relative to --image_size (face placed by a random similarity)",
    "family_size": "mean identities per family (families share colouring and face shape: hard impostors)",
}
