"""IDC's DiffAug as DiM uses it (vimar-gu/DiM ``augment.py``, class ``DiffAug``).

DiM builds two instances (``pool_match.py:257-279``, same in ``gen_condense.py:185-207``):

* ``aug``      = ``DiffAug("color_crop_cutout", batch=True)``: ONE random draw shared by the whole
  batch. DiM calls it on ``cat([x_real, x_syn])``, so real and synthetic images get the same
  (siamese) transform. Here: ``diffaug(x, DIM_AUG)``.
* ``aug_rand`` = ``DiffAug("color_crop", batch=False)``: an independent draw per sample ("cutout"
  removed because of ``--mixup-net cut``). Here: ``diffaug(x, DIM_AUG_RAND, per_sample=True)``.

Both are preceded in DiM by ``Normalize(dataset mean/std)``; that step is NOT part of this module
(ddfast normalises images before calling it).

Semantics reproduced from ``augment.py`` (line numbers of vimar-gu/DiM @ 3657339):

* order (``__call__``, 54-84): color (brightness, saturation, contrast) -> crop -> cutout, whatever the
  order of the words in ``strategy``. "color" and "cutout" are flags (34-42); every other word goes to
  a list from which ``single_aug`` picks ONE at random (65-72); for the strategies supported here that
  list is at most ``["crop"]``, so crop is always applied when present.
* brightness (144-153): ``x + (r - 0.5) * 1.0``, r ~ U[0, 1).
* saturation (155-165): ``(x - mean_c x) * (r * 2.0) + mean_c x`` (mean over channels). For a
  1-channel image ``x - mean_c x == 0``, so it is the identity (the number is still drawn).
* contrast (167-177): ``(x - mean_chw x) * (r + 0.5) + mean_chw x`` (mean over C, H, W per sample).
* crop (201-229): integer translation by ``(t_h, t_w)``, ``t ~ U{-s, .., s}``, ``s = int(size * 0.125 + 0.5)``
  (4 for 28 and 32 px), ``out[i, j] = x[i + t_h, j + t_w]`` and 0 where that falls outside the image
  (the code pads by one zero row/column and clamps the index into the padding).
* cutout (231-259): square of ``c = int(size * 0.5 + 0.5)`` pixels per side (14 for 28 px, 16 for 32 px),
  centre ``o ~ U{0, .., size - 1 + (1 - c % 2)}``, rows ``[o - c // 2, o - c // 2 + c)`` clipped to the
  image are multiplied by 0 in every channel (the code's clamp only ever repeats rows that are
  already inside the clipped square, so clipping is exact).
* ``batch=True`` (148-149, 160-161, 172-173, 206-208, 235-237): one scalar per transform for the whole
  batch; ``batch=False``: one number per sample (shape ``[n, 1, 1, 1]`` / ``[n, 1, 1]``).

Differences from the official code, all outside the distribution of the output:

* randomness comes from ``generator`` (torch) instead of the global numpy RNG (batch mode) / global
  torch RNG (per-sample mode); uniform draws are taken in float64 and cast to ``x.dtype``, so float32
  and float64 inputs see the same numbers;
* the official ``single_aug`` pick (``np.random.randint(len(strategy))``) consumes a number but can only
  pick "crop" here, so no draw is made for it;
* only the "color", "crop" and "cutout" parts are supported (the ones DiM uses); unknown or repeated
  parts raise ``ValueError`` instead of being silently ignored / applied once.

The random draws and their application are separate (:func:`draw_params`, :func:`apply_params` and
the per-transform ``apply_*`` functions), so each can be tested on its own.
"""
from __future__ import annotations

import dataclasses

import torch

__all__ = [
    "DIM_AUG",
    "DIM_AUG_RAND",
    "KNOWN_PARTS",
    "DiffAugParams",
    "diffaug",
    "draw_params",
    "apply_params",
    "apply_brightness",
    "apply_saturation",
    "apply_contrast",
    "apply_crop",
    "apply_cutout",
    "crop_shift_range",
    "cutout_size",
]

DIM_AUG = "color_crop_cutout"  # DiM's ``aug`` (batch=True)
DIM_AUG_RAND = "color_crop"  # DiM's ``aug_rand`` (batch=False)
KNOWN_PARTS = ("color", "crop", "cutout")

# DiffAug.__init__ constants (augment.py:17-22).
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5
RATIO_CROP_PAD = 0.125
RATIO_CUTOUT = 0.5


@dataclasses.dataclass(frozen=True)
class DiffAugParams:
    """One draw of DiffAug's random numbers; ``None`` = transform not applied.

    Every tensor has a leading dimension of ``n`` (per-sample draw) or 1 (one draw for the batch):
    ``brightness``, ``saturation``, ``contrast`` are the raw U[0, 1) numbers (float64) of
    augment.py:149/151, 161/163, 173/175; ``crop`` is ``[m, 2]`` int64 (row shift, column shift),
    augment.py:207-218; ``cutout`` is ``[m, 2]`` int64 (centre row, centre column), augment.py:236-247.
    """

    brightness: torch.Tensor | None = None
    saturation: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    crop: torch.Tensor | None = None
    cutout: torch.Tensor | None = None


def _parse(strategy: str) -> frozenset[str]:
    if not isinstance(strategy, str):
        raise ValueError(f"strategy must be a str such as {DIM_AUG!r}, got {strategy!r}")
    text = strategy.lower()
    if text in ("", "none"):  # augment.py:27-28: no augmentation
        return frozenset()
    parts = text.split("_")
    unknown = [p for p in parts if p not in KNOWN_PARTS]
    if unknown:
        raise ValueError(
            f"unknown DiffAug part(s) {unknown} in strategy {strategy!r}; known parts: {', '.join(KNOWN_PARTS)} "
            f"joined by '_' (e.g. {DIM_AUG!r}), or 'none'"
        )
    repeated = sorted({p for p in parts if parts.count(p) > 1})
    if repeated:
        raise ValueError(f"DiffAug part(s) {repeated} repeated in strategy {strategy!r}; each is applied once")
    return frozenset(parts)


def crop_shift_range(size: int) -> int:
    """Largest crop shift ``s`` for an image side of ``size`` pixels (augment.py:205): ``int(size * 0.125 + 0.5)``."""
    return int(size * RATIO_CROP_PAD + 0.5)


def cutout_size(size: int) -> int:
    """Cutout side for an image side of ``size`` pixels (augment.py:233): ``int(size * 0.5 + 0.5)``."""
    return int(size * RATIO_CUTOUT + 0.5)


def draw_params(
    x: torch.Tensor,
    strategy: str = DIM_AUG,
    per_sample: bool = False,
    generator: torch.Generator | None = None,
) -> DiffAugParams:
    """Draw the random numbers for ``diffaug(x, strategy, per_sample)`` from ``generator``.

    Only ``x.shape`` is used. Draw order: brightness, saturation, contrast, crop (rows, columns),
    cutout (rows, columns); a transform absent from ``strategy`` draws nothing. The numbers live on
    the generator's device (CPU for ``None``, the global torch RNG).
    """
    parts = _parse(strategy)
    if x.dim() != 4:
        raise ValueError(f"DiffAug expects a [N, C, H, W] batch, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    m = n if per_sample else 1
    device = generator.device if generator is not None else torch.device("cpu")

    def uniform() -> torch.Tensor:
        return torch.rand(m, generator=generator, device=device, dtype=torch.float64)

    def integers(low: tuple[int, int], high: tuple[int, int]) -> torch.Tensor:
        # torch.randint's high is exclusive, as np.random.randint's (augment.py:207, 236).
        cols = [torch.randint(lo, hi, (m,), generator=generator, device=device) for lo, hi in zip(low, high)]
        return torch.stack(cols, dim=1)

    params: dict[str, torch.Tensor] = {}
    if "color" in parts:
        params["brightness"] = uniform()
        params["saturation"] = uniform()
        params["contrast"] = uniform()
    if "crop" in parts:
        sh, sw = crop_shift_range(h), crop_shift_range(w)
        params["crop"] = integers((-sh, -sw), (sh + 1, sw + 1))
    if "cutout" in parts:
        ch, cw = cutout_size(h), cutout_size(w)
        params["cutout"] = integers((0, 0), (h + (1 - ch % 2), w + (1 - cw % 2)))
    return DiffAugParams(**params)


def _per_image(value: torch.Tensor, x: torch.Tensor, what: str) -> torch.Tensor:
    """``[m]`` float draw -> ``[m, 1, 1, 1]`` in x's dtype/device, checking m in (1, n)."""
    if value.dim() != 1 or value.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"{what} draw must have shape [1] or [{x.shape[0]}], got {tuple(value.shape)}")
    return value.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _per_image_int(value: torch.Tensor, x: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if value.dim() != 2 or value.shape[1] != 2 or value.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"{what} draw must have shape [1, 2] or [{x.shape[0]}, 2], got {tuple(value.shape)}")
    value = value.to(device=x.device, dtype=torch.long)
    return value[:, 0:1], value[:, 1:2]  # [m, 1] each


def apply_brightness(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """augment.py:144-153: ``x + (r - 0.5) * 1.0``; ``r`` is ``[1]`` or ``[n]``."""
    return x + (_per_image(r, x, "brightness") - 0.5) * BRIGHTNESS


def apply_saturation(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """augment.py:155-165: ``(x - mean_c) * (r * 2.0) + mean_c``; the identity for 1 channel."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_per_image(r, x, "saturation") * SATURATION) + mean


def apply_contrast(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """augment.py:167-177: ``(x - mean_chw) * (r + 0.5) + mean_chw`` (mean over C, H, W of each image)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_per_image(r, x, "contrast") + CONTRAST) + mean


def apply_crop(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """augment.py:201-229: ``out[:, :, i, j] = x[:, :, i + t_h, j + t_w]``, 0 outside the image.

    ``shift`` is ``[1, 2]`` or ``[n, 2]`` integer (t_h, t_w). Any shift is accepted (a shift beyond
    the image gives zeros); :func:`draw_params` draws ``|t| <= crop_shift_range(size)``.
    """
    n, _, h, w = x.shape
    th, tw = _per_image_int(shift, x, "crop")
    rows = torch.arange(h, device=x.device).view(1, h) + th  # [m, h] source row of each output row
    cols = torch.arange(w, device=x.device).view(1, w) + tw  # [m, w]
    inside = ((rows >= 0) & (rows < h)).unsqueeze(2) & ((cols >= 0) & (cols < w)).unsqueeze(1)  # [m, h, w]
    rows, cols = rows.clamp(0, h - 1).expand(n, h), cols.clamp(0, w - 1).expand(n, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    # Advanced indices split by the channel slice go first: [n, h, w, C] -> [n, C, h, w].
    moved = x[batch, :, rows.unsqueeze(2), cols.unsqueeze(1)].permute(0, 3, 1, 2)
    return torch.where(inside.unsqueeze(1), moved, torch.zeros((), dtype=x.dtype, device=x.device))


def apply_cutout(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """augment.py:231-259: multiply by 0, in every channel, the ``cutout_size(H) x cutout_size(W)``
    square with rows ``[o_h - c_h // 2, o_h - c_h // 2 + c_h)`` (columns likewise), clipped to the image.

    ``centre`` is ``[1, 2]`` or ``[n, 2]`` integer (o_h, o_w).
    """
    _, _, h, w = x.shape
    ch, cw = cutout_size(h), cutout_size(w)
    oh, ow = _per_image_int(centre, x, "cutout")
    rows = torch.arange(h, device=x.device).view(1, h) - (oh - ch // 2)  # position inside the square
    cols = torch.arange(w, device=x.device).view(1, w) - (ow - cw // 2)
    cut = ((rows >= 0) & (rows < ch)).unsqueeze(2) & ((cols >= 0) & (cols < cw)).unsqueeze(1)  # [m, h, w]
    mask = (~cut).to(x.dtype).unsqueeze(1)  # x * mask as augment.py:258
    return x * mask


def apply_params(x: torch.Tensor, params: DiffAugParams) -> torch.Tensor:
    """Apply a draw in DiffAug's order (augment.py:61-81): brightness, saturation, contrast, crop, cutout."""
    if params.brightness is not None:
        x = apply_brightness(x, params.brightness)
    if params.saturation is not None:
        x = apply_saturation(x, params.saturation)
    if params.contrast is not None:
        x = apply_contrast(x, params.contrast)
    if params.crop is not None:
        x = apply_crop(x, params.crop)
    if params.cutout is not None:
        x = apply_cutout(x, params.cutout)
    return x.contiguous()  # augment.py:83


def diffaug(
    x: torch.Tensor,
    strategy: str = DIM_AUG,
    per_sample: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DiM's DiffAug on a normalised ``[N, C, H, W]`` batch; differentiable w.r.t. ``x``.

    ``strategy``: "_"-joined subset of ``color``, ``crop``, ``cutout`` (or "none"); always applied
    in the order color -> crop -> cutout (augment.py:54-84). ``per_sample=False`` is the official
    ``batch=True`` (one draw for the whole batch, DiM's ``aug``); ``per_sample=True`` is ``batch=False``
    (DiM's ``aug_rand``). All randomness comes from ``generator`` (the global torch RNG if None), so
    equal generator states give equal outputs. DiM's preceding Normalize step is not included.
    """
    return apply_params(x, draw_params(x, strategy, per_sample, generator))
