"""Batch-level image transforms, applied on the device that trains (GPU when there is one).

Images travel from the loaders as uint8 NCHW RGB tensors; flipping and scaling to [-1, 1] happen
here on the whole batch instead of per image in PIL, which is what keeps the loader cheap.
"""
import torch


def normalize_batch(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, H, W) RGB in [0, 255] -> `dtype` in [-1, 1], as InsightFace trains."""
    return images.to(dtype).sub_(127.5).div_(127.5)


def random_hflip(images: torch.Tensor, generator: torch.Generator = None, p: float = 0.5) -> torch.Tensor:
    """Flip each image of an (N, C, H, W) batch horizontally with probability `p`."""
    flip = torch.rand(images.shape[0], generator=generator, device="cpu") < p
    if not bool(flip.any()):
        return images
    if images.is_cuda:  # from pinned memory, without the host-device sync a pageable copy makes
        flip = flip.pin_memory().to(images.device, non_blocking=True)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
