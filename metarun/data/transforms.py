"""Per-dataset transforms of a gathered batch, as tensor operations on the data's device.

Normalisation (per-channel mean and std of the dataset, in [0, 1] units) applies to every split.
Augmentation applies to meta-training tasks only, as the papers train: every random parameter is drawn
in ``draw`` from the task generator (so a checkpoint replays them exactly) and applied in ``apply`` to
the whole (T, n, k, C, H, W) batch at once. Evaluation never augments.

- ``resized_crop``: a random crop of 8-100% of the area, aspect ratio in [3/4, 4/3], resized back to the
  image size (bilinear; Inception-style, as in ProtoNet/MetaOptNet miniImageNet code).
- ``pad_crop``: pad 4 pixels with zeros, then crop back at a random offset (the CIFAR protocol).
- ``flip``: a horizontal flip with probability 1/2.
- ``jitter``: brightness, contrast and saturation each scaled by a factor in [0.6, 1.4] (colour jitter 0.4).
"""

import math

import torch
import torch.nn.functional as F

AUGMENTS = ("resized_crop", "pad_crop", "flip", "jitter")
PAD = 4
JITTER = 0.4
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def normalize(x: torch.Tensor, mean, std, inplace: bool = False) -> torch.Tensor:
    """``x`` (..., C, H, W) in [0, 1] less the channel ``mean``, over the channel ``std`` (None: unchanged);
    ``inplace`` overwrites ``x`` (a fresh batch) instead of making two more copies of it."""
    if mean is None:
        return x
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(mean).div_(std) if inplace else (x - mean) / std


class Augment:
    """The training-split augmentations ``names`` (a subset of AUGMENTS, applied in that fixed order)."""

    def __init__(self, names=()):
        names = tuple(names)
        unknown = [n for n in names if n not in AUGMENTS]
        if unknown:
            raise ValueError(f"augment takes a list of {', '.join(AUGMENTS)}, got {unknown[0]!r}")
        if "resized_crop" in names and "pad_crop" in names:
            raise ValueError("augment takes resized_crop or pad_crop, not both")
        self.names = tuple(n for n in AUGMENTS if n in names)

    def __bool__(self) -> bool:
        return bool(self.names)

    def draw(self, shape: tuple[int, int, int], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """One parameter tensor per augmentation, each (T, n, k, ...) for a batch of ``shape`` (T, n, k)."""
        out = []
        for name in self.names:
            if name == "resized_crop":
                u = torch.rand(*shape, 4, generator=generator, dtype=torch.float64)
                area = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[..., 0]
                log_ratio = math.log(CROP_RATIO[0]) + (math.log(CROP_RATIO[1]) - math.log(CROP_RATIO[0])) * u[..., 1]
                ratio = log_ratio.exp()
                w = (area * ratio).sqrt().clamp(max=1.0)
                h = (area / ratio).sqrt().clamp(max=1.0)
                x0, y0 = (1 - w) * u[..., 2], (1 - h) * u[..., 3]
                out.append(torch.stack([x0, y0, w, h], dim=-1).float())  # fractions of the image
            elif name == "pad_crop":
                out.append(torch.randint(0, 2 * PAD + 1, (*shape, 2), generator=generator))
            elif name == "flip":
                out.append(torch.rand(*shape, generator=generator) < 0.5)
            elif name == "jitter":
                out.append(1 - JITTER + 2 * JITTER * torch.rand(*shape, 3, generator=generator))
        return tuple(out)

    def apply(self, x: torch.Tensor, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``x`` float (T, n, k, C, H, W) in [0, 1], augmented with ``params`` from ``draw``."""
        lead, image = x.shape[:3], x.shape[3:]
        x = x.reshape(-1, *image)
        for name, p in zip(self.names, params):
            p = p.to(x.device).reshape(x.shape[0], *p.shape[3:])
            if name == "resized_crop":
                x = resized_crop(x, p)
            elif name == "pad_crop":
                x = pad_crop(x, p)
            elif name == "flip":
                x = torch.where(p[:, None, None, None], x.flip(-1), x)
            elif name == "jitter":
                x = jitter(x, p)
        return x.reshape(*lead, *image)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box (x0, y0, w, h in fractions) resized back to the image size, bilinear."""
    m = x.shape[0]
    x0, y0, w, h = boxes.unbind(-1)
    theta = torch.zeros(m, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = w, 2 * x0 + w - 1  # output [-1, 1] -> the box in input coordinates
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * y0 + h - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def pad_crop(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pad by PAD, then crop the image size at each image's (dx, dy) in [0, 2 * PAD]."""
    m, c, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    rows = (offsets[:, 1, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(m, c, h, w + 2 * PAD)
    x = padded.gather(2, rows)
    cols = (offsets[:, 0, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(m, c, h, w)
    return x.gather(3, cols)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation scaled by each image's three factors, clamped to [0, 1]."""
    b, c, s = (f.view(-1, 1, 1, 1).to(x.dtype) for f in factors.unbind(-1))
    x = (x * b).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp(0, 1)
    gray = _gray(x)
    return ((x - gray) * s + gray).clamp(0, 1)
