"""Five-point face alignment to the ArcFace template (the crop every InsightFace model is trained on).

A similarity transform (rotation, uniform scale, translation; never a reflection) is fitted by least
squares from the detected landmarks to the template (Umeyama 1991), then the image is warped with
`cv2.warpAffine` (bilinear, black border), as InsightFace's IJB evaluation does.
"""
import cv2
import numpy as np

# Left eye, right eye, nose tip, left and right mouth corners (x, y) in a 112 x 112 crop,
# "left" meaning the image's left.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def arcface_template(image_size=112):
    """The (5, 2) template for a square crop of `image_size` pixels: the 112 template scaled by size / 112."""
    return ARCFACE_TEMPLATE_112 * (float(image_size) / 112.0)


def estimate_similarity(src, dst):
    """Least-squares similarity transform taking points `src` (N, 2) onto `dst` (N, 2).

    Returns the (2, 3) float64 matrix M with dst ~= M @ [x, y, 1]. Umeyama's closed form: the rotation
    comes from the SVD of the cross-covariance, with the sign of its last singular direction chosen so
    that the rotation is proper (det = +1), i.e. mirrored landmarks are not "fixed" by a reflection.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"expected two (N, 2) point sets with N >= 2, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("landmarks contain NaN or infinity")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c ** 2).sum() / len(src)
    if src_var <= 0.0:
        raise ValueError(f"degenerate landmarks (all points coincide): {src.tolist()}")
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rotation = u @ np.diag(d) @ vt
    scale = float((s * d).sum() / src_var)
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def align_face(img, landmarks5, image_size=112):
    """Warp `img` (H, W, C) uint8 so that its five `landmarks5` (5, 2) (x, y) land on the ArcFace template.

    Returns a uint8 (image_size, image_size, C) crop. Channel order is kept as given (RGB in, RGB out).
    """
    landmarks5 = np.asarray(landmarks5, dtype=np.float64)
    if landmarks5.shape != (5, 2):
        raise ValueError(f"expected (5, 2) landmarks, got shape {landmarks5.shape}")
    matrix = estimate_similarity(landmarks5, arcface_template(image_size))
    return cv2.warpAffine(img, matrix, (int(image_size), int(image_size)), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
