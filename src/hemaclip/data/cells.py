"""Find white blood cells in any blood-smear picture, so every picture reaches the model like a training cell.

Other labs hand over CellaVision crops, 120 px crops filled by the cell, 224 px crops with black
padding, or whole 640x480 camera fields with one or several white cells among red cells. A small
fully-convolutional U-Net (GroupNorm, so one image is normalised the same whatever the lab or batch)
predicts background / cytoplasm / nucleus at a working scale where cells are ~25-120 px wide; the
scale is picked per image in two passes, so crops and fields of another magnification go through the
same code. `crop_cell` then centres each cell in a square of a fixed multiple of its diameter, padded
with the smear's background colour (not black, not reflected: both invent structure).

The shipped weights (assets/cell-segmenter.pt) were trained on all 400 Zheng 2018 expert masks (nucleus/cytoplasm,
no class labels), test parts included, with strong colour, scale and blur augmentation: its Zheng box figures are
in-sample. The training code is :mod:`hemaclip.train.segmenter` (entry: ``python -m bench.train_segmenter``, Zheng val
parts only by default); bench/cell_finding_out_of_sample.py scores such weights on the test parts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage as ndi
from skimage import filters, measure, morphology, segmentation
from skimage.feature import peak_local_max

CLASSES = ("background", "cytoplasm", "nucleus")
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "cell-segmenter.pt"


# ----------------------------------------------------------------------------- model
def _block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convs with GroupNorm: GroupNorm (not BatchNorm) so that one image at test
    time is normalised exactly as in training, whatever the lab or batch."""
    g = max(1, cout // 8)
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(g, cout), nn.SiLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(g, cout), nn.SiLU(inplace=True),
    )


class TinyUNet(nn.Module):
    """~0.5 M-parameter U-Net. The stem has stride 2 (features at half resolution) which
    makes it 4x cheaper on CPU; cell boxes only need ~2 working pixels of precision."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128), n_classes: int = 3) -> None:
        super().__init__()
        w = list(widths)
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, stride=2, padding=1), nn.SiLU(inplace=True))
        self.enc = nn.ModuleList([_block(w[0], w[0])] + [_block(w[i - 1], w[i]) for i in range(1, len(w))])
        self.dec = nn.ModuleList([_block(w[i] + w[i - 1], w[i - 1]) for i in range(len(w) - 1, 0, -1)])
        self.head = nn.Conv2d(w[0], n_classes, 1)
        self.stride = 2 ** len(w)  # input sides must be a multiple of this

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = self.stem(x)
        skips = []
        for i, enc in enumerate(self.enc):
            if i:
                x = F.max_pool2d(x, 2)
            x = enc(x)
            skips.append(x)
        for dec, skip in zip(self.dec, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = dec(torch.cat([x, skip], 1))
        return F.interpolate(self.head(x), size=(h, w), mode="bilinear", align_corners=False)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Fixed affine input scaling (float RGB in [0,1]); colour robustness comes from augmentation."""
    return (x - 0.5) / 0.25


_MODEL_CACHE: dict[str, TinyUNet] = {}


def segmenter_id(path: str | Path | None = None) -> str:
    """Short SHA-1 of the segmenter weights: part of every cache key of cell-framed images."""
    from hemaclip.cache import file_sha1

    return file_sha1(path or DEFAULT_WEIGHTS)[:12]


def load_model(path: str | Path | None = None) -> TinyUNet:
    """Load (and cache) the segmenter from a state dict saved in fp16 or fp32."""
    path = str(path or DEFAULT_WEIGHTS)
    if path not in _MODEL_CACHE:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        widths = tuple(int(v) for v in sd.pop("_widths").tolist()) if "_widths" in sd else (16, 32, 64, 128)
        m = TinyUNet(widths)
        m.load_state_dict({k: v.float() for k, v in sd.items()})
        _MODEL_CACHE[path] = m.eval()
    return _MODEL_CACHE[path]


# ----------------------------------------------------------------------------- inference
@torch.no_grad()
def segment_probs(image: np.ndarray, scale: float, model: TinyUNet | None = None, tta: bool = False) -> np.ndarray:
    """Class probabilities (3,H,W) at the original resolution, running the net on the image
    resized by `scale` (padded by edge replication to the net's stride). tta averages the
    logits over the identity and a 180-degree rotation (2x the cost)."""
    model = model or load_model()
    h, w = image.shape[:2]
    x = torch.from_numpy(np.array(image[..., :3], dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
    hs, ws = max(8, round(h * scale)), max(8, round(w * scale))
    if (hs, ws) != (h, w):
        x = F.interpolate(x, size=(hs, ws), mode="bilinear", align_corners=False, antialias=scale < 1)
    st = model.stride
    ph, pw = (-hs) % st, (-ws) % st
    if ph or pw:
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")
    x = normalise(x)
    logits = model(x)
    if tta:
        logits = 0.5 * (logits + model(x.flip(-1, -2)).flip(-1, -2))
    logits = logits[..., ph // 2: ph // 2 + hs, pw // 2: pw // 2 + ws]
    if (hs, ws) != (h, w):
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return torch.softmax(logits, 1)[0].numpy()


class _CellGeometry:
    """What framing reads of a cell: its equivalent diameter and box centre (needs `box` and `area`)."""

    box: tuple[int, int, int, int]
    area: int

    @property
    def diameter(self) -> float:
        """Equivalent-circle diameter of the cell mask in original pixels."""
        return float(2.0 * np.sqrt(self.area / np.pi))

    @property
    def centre(self) -> tuple[float, float]:
        """Box centre (x, y): framing by box keeps the whole cell in view."""
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0


@dataclass
class Cell(_CellGeometry):
    """One white cell. `mask` is box-sized (rows y0:y1, cols x0:x1 of the original image)."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive), original pixels
    mask: np.ndarray  # bool, shape (y1-y0, x1-x0)
    nucleus_area: int  # original pixels
    score: float  # mean confidence in [0,1]
    touches_border: bool = False  # cut by the image edge or by black padding
    area: int = 0
    nucleus_mask: np.ndarray | None = field(default=None, repr=False)  # box-sized bool


def padding_bands(image: np.ndarray, dark: int = 25) -> np.ndarray:
    """Bool mask of black padding bands touching the border (LISC-style crops)."""
    v = image[..., :3].max(-1)
    h, w = v.shape
    band = np.zeros((h, w), bool)
    rows_dark = (v < dark).mean(1) > 0.95
    cols_dark = (v < dark).mean(0) > 0.95
    for seq, setter in (
        (rows_dark, lambda k: band.__setitem__((slice(0, k), slice(None)), True)),
        (rows_dark[::-1], lambda k: band.__setitem__((slice(h - k, h), slice(None)), True)),
        (cols_dark, lambda k: band.__setitem__((slice(None), slice(0, k)), True)),
        (cols_dark[::-1], lambda k: band.__setitem__((slice(None), slice(w - k, w)), True)),
    ):
        k = int(np.argmin(seq)) if not seq.all() else len(seq)
        if k:
            setter(k)
    return band


def _remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop connected components smaller than min_size px (stable across skimage versions)."""
    lab, n = ndi.label(mask)
    if n == 0:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[lab]


def _split_component(comp: np.ndarray, nuc: np.ndarray, min_piece: float, drop_nuc_frac: float = 0.0) -> list[np.ndarray]:
    """Split a blob made of touching cells along distance-transform necks.

    Only tried on blobs with solidity < 0.95 (a single WBC is nearly convex); pieces meeting along a
    wide boundary, or that carry almost no nucleus, are merged back, so lobed nuclei and
    irregular monocytes are not cut. Nucleus-free pieces behind a narrow neck (a red cell
    glued to the cytoplasm) are dropped when their nucleus share < drop_nuc_frac."""
    area = comp.sum()
    props = measure.regionprops(comp.astype(np.uint8))[0]
    if props.solidity > 0.95 or area < 2 * min_piece:
        return [comp]
    dist = ndi.distance_transform_edt(comp)
    r = np.sqrt(area / np.pi)
    # in a clump the blob radius overstates one cell's radius: use the nuclei's size too
    nl, nn = ndi.label(nuc & comp)
    if nn:
        ns = np.bincount(nl.ravel())[1:]
        ns = ns[ns >= 0.02 * area]
        if len(ns):
            r = min(r, 1.4 * np.sqrt(np.median(ns) / np.pi))
    pk = peak_local_max(ndi.gaussian_filter(dist, 1.0), min_distance=max(3, int(0.35 * r)),
                        threshold_abs=0.3 * dist.max(), labels=comp.astype(np.int32), exclude_border=False)
    if len(pk) < 2:
        return [comp]
    markers = np.zeros(comp.shape, np.int32)
    markers[tuple(pk.T)] = np.arange(1, len(pk) + 1)
    lab = segmentation.watershed(-dist, markers, mask=comp)
    # iterative merge of pieces
    changed = True
    while changed:
        changed = False
        ids = [i for i in np.unique(lab) if i]
        if len(ids) < 2:
            break
        sizes = {i: (lab == i).sum() for i in ids}
        for i in sorted(ids, key=lambda k: sizes[k]):
            pi = lab == i
            ring = ndi.binary_dilation(pi) & ~pi & comp
            nbrs, counts = np.unique(lab[ring], return_counts=True)
            keep = nbrs > 0
            nbrs, counts = nbrs[keep], counts[keep]
            if not len(nbrs):
                continue
            j = int(nbrs[np.argmax(counts)])
            neck = counts.max()
            di = 2 * np.sqrt(sizes[i] / np.pi)
            dj = 2 * np.sqrt(sizes[j] / np.pi)
            nuc_frac = nuc[pi].mean()
            if neck > 0.6 * min(di, dj):
                lab[pi] = j
            elif nuc_frac < drop_nuc_frac:  # nucleus-free lobe behind a neck: a glued red cell
                lab[pi] = 0
            elif sizes[i] < min_piece or nuc_frac < 0.08:
                lab[pi] = j
            else:
                continue
            changed = True
            break
    return [lab == i for i in np.unique(lab) if i]


def refine_cell_mask(image: np.ndarray, p_cell: np.ndarray, scale: float, lo: float = 0.2, hi: float = 0.8) -> np.ndarray:
    """Decide the uncertain band (lo < p < hi) of the cell probability by a marker watershed
    on the colour gradient: the membrane between cytoplasm and a touching red cell is an
    edge even where the net hesitates."""
    sigma = max(1.0, 0.6 / scale)
    img = filters.gaussian(image[..., :3].astype(np.float32) / 255, sigma=sigma, channel_axis=-1)
    grad = sum(filters.sobel(img[..., k]) for k in range(3))
    markers = np.zeros(p_cell.shape, np.int32)
    markers[p_cell < lo] = 1
    markers[p_cell > hi] = 2
    return segmentation.watershed(grad, markers) == 2


def cells_from_probs(
    probs: np.ndarray,
    scale: float,
    pad: np.ndarray | None = None,
    min_diam_work: float = 20.0,
    min_nuc_frac: float = 0.06,
    cell_thr: float = 0.5,
    image: np.ndarray | None = None,
    drop_glued: float = 0.02,
) -> list[Cell]:
    """Turn class probabilities into one Cell per white cell.

    Size limits are given in working pixels (the net saw cells 20-125 px wide) and converted
    with `scale`, so the same rule holds at any magnification. Given `image`, the cell
    outline is refined by refine_cell_mask."""
    p_cell = probs[1] + probs[2]
    cell = p_cell > cell_thr if image is None else refine_cell_mask(image, p_cell, scale)
    nuc = (probs[2] > 0.5) & cell
    if pad is not None:
        cell &= ~pad
        nuc &= ~pad
    h, w = cell.shape
    min_area = np.pi * (min_diam_work / 2 / scale) ** 2
    cell = ndi.binary_fill_holes(cell)
    cell = _remove_small(cell, max(4, int(min_area * 0.5)))
    border = np.zeros((h, w), bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    if pad is not None and pad.any():
        border |= ndi.binary_dilation(pad, iterations=2)
    lab, n = ndi.label(cell)
    out: list[Cell] = []
    for sl_i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        comp = lab[sl] == sl_i
        for piece in _split_component(comp, nuc[sl], min_area * 0.6, drop_glued):
            area = int(piece.sum())
            nuc_p = piece & nuc[sl]
            na = int(nuc_p.sum())
            if area < min_area or na < max(3, min_nuc_frac * area):
                continue
            ys, xs = np.nonzero(piece)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            m = piece[y0:y1, x0:x1]
            gy0, gx0 = sl[0].start + y0, sl[1].start + x0
            box = (int(gx0), int(gy0), int(gx0 + x1 - x0), int(gy0 + y1 - y0))
            full = np.zeros((h, w), bool)
            full[box[1]:box[3], box[0]:box[2]] = m
            score = 0.5 * float(p_cell[full].mean()) + 0.5 * float(probs[2][full & nuc].mean())
            out.append(Cell(box=box, mask=m, nucleus_area=na, score=score,
                            touches_border=bool((full & border).any()), area=area,
                            nucleus_mask=nuc_p[y0:y1, x0:x1]))
    out.sort(key=lambda c: -c.area)
    return out


def nucleus_contrast(image: np.ndarray, cells: list[Cell]) -> list[float]:
    """Darkness of each cell's nucleus relative to the red cells of the same picture.

    Darkness = background minus min(R,G,B). Chromatin absorbs in every channel, so a true
    nucleus is >= 1.65x as dark as the red cells in every lab seen (LISC, PBC, Zheng);
    red cells that the net mistook for white cells (bluish LISC red cells) are 1.2-1.5x.
    Returns NaN per cell when no red-cell reference is visible."""
    dark = image[..., :3].astype(np.float32).min(-1)
    bgl = float(background_colour(image).min())
    cm = np.zeros(dark.shape, bool)
    for c in cells:
        cm[c.box[1]:c.box[3], c.box[0]:c.box[2]] |= c.mask
    other = (dark < bgl - 12) & ~ndi.binary_dilation(cm, iterations=3) & ~padding_bands(image)
    if other.sum() < 50:
        return [float("nan")] * len(cells)
    ref = max(1.0, bgl - float(np.median(dark[other])))
    out = []
    for c in cells:
        x0, y0, x1, y1 = c.box
        nl = dark[y0:y1, x0:x1][c.nucleus_mask] if c.nucleus_mask is not None else np.empty(0)
        out.append((bgl - float(np.percentile(nl, 25))) / ref if len(nl) else 0.0)
    return out


def find_cells(
    image: np.ndarray,
    model: TinyUNet | None = None,
    work_side: int = 160,
    target_diam: float = 64.0,
    ok_range: tuple[float, float] = (38.0, 110.0),
    max_work_side: int = 1024,
    return_scale: bool = False,
    tta: bool = False,
    cell_thr: float = 0.5,
    min_score: float = 0.8,
    refine: bool = True,
    min_contrast: float = 1.55,
):
    """Find every white cell in an RGB uint8 picture (crop or field).

    Pass 1 runs the net with the long side at `work_side` px. If the cells found are outside
    the range the net was trained for (or none are found, as in low-magnification fields),
    pass 2 reruns at the scale that brings the median cell to `target_diam` working px
    (or 2.5x up when nothing was found). Objects under 20 working px (platelets at usual
    magnifications) are dropped. `min_score` drops red cells the net half-believes
    (their scores are 0.6-0.75, white cells 0.85-0.96); `min_contrast` drops objects whose
    'nucleus' is not clearly darker than the red cells (see nucleus_contrast).
    Thresholds were set by looking at fold-0 Zheng, PBC and LISC pictures, not fitted."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, -1)
    image = image[..., :3]
    model = model or load_model()
    h, w = image.shape[:2]
    pad = padding_bands(image)
    s1 = work_side / max(h, w)
    cells = cells_from_probs(segment_probs(image, s1, model, tta), s1, pad, cell_thr=cell_thr,
                             image=image if refine else None)

    def keep(cs: list[Cell]) -> list[Cell]:
        cs = [c for c in cs if c.score >= min_score]
        if min_contrast > 0 and cs:
            con = nucleus_contrast(image, cs)
            cs = [c for c, k in zip(cs, con) if not (k < min_contrast)]
        return cs

    cells = keep(cells)
    scale = s1
    if cells:
        good = [c for c in cells if not c.touches_border] or cells
        # touching cells can merge into one blob at a too-small scale; the largest nucleus
        # piece of each cell (x1.4, a typical cell/nucleus diameter ratio) is not fooled
        d_cell = np.array([c.diameter for c in good])
        d_nuc = np.array([1.4 * _largest_piece_diam(c.nucleus_mask) for c in good])
        d_work = float(np.median(np.minimum(d_cell, np.maximum(d_nuc, 0.5 * d_cell)))) * s1
        s2 = s1 * target_diam / d_work if not (ok_range[0] <= d_work <= ok_range[1]) else None
    else:
        s2 = s1 * 2.5
    if s2 is not None:
        s2 = min(s2, max_work_side / max(h, w))
        if abs(np.log(s2 / s1)) > 0.15:
            cells2 = keep(cells_from_probs(segment_probs(image, s2, model, tta), s2, pad, cell_thr=cell_thr,
                                           image=image if refine else None))
            if cells2 or not cells:
                cells, scale = cells2, s2
    return (cells, scale) if return_scale else cells


def _largest_piece_diam(mask: np.ndarray | None) -> float:
    """Equivalent diameter of the largest connected piece of a mask (0 if empty)."""
    if mask is None or not mask.any():
        return 0.0
    lab, n = ndi.label(mask)
    return float(2 * np.sqrt(np.bincount(lab.ravel())[1:].max() / np.pi))


def primary_cell(cells: list[Cell], shape: tuple[int, int]) -> Cell | None:
    """The cell a single-cell crop is about: the one covering the centre, else the largest."""
    if not cells:
        return None
    cy, cx = shape[0] // 2, shape[1] // 2
    for c in cells:
        x0, y0, x1, y1 = c.box
        if x0 <= cx < x1 and y0 <= cy < y1 and c.mask[cy - y0, cx - x0]:
            return c
    return max(cells, key=lambda c: c.area)


# ----------------------------------------------------------------------------- framing
def background_colour(image: np.ndarray) -> np.ndarray:
    """Smear background (plasma/glass) colour: median of the brightest, least saturated
    pixels (black padding excluded). Used to pad crops so no artificial edge appears."""
    x = image[..., :3].reshape(-1, 3).astype(np.float32)
    v = x.max(1)
    s = (v - x.min(1)) / (v + 1e-6)
    ok = v > 40
    if ok.sum() < 16:
        return np.array([255, 255, 255], np.float32)
    score = v / 255.0 - s
    thr = np.percentile(score[ok], 90)
    return np.median(x[ok & (score >= thr)], 0)


def crop_cell(image: np.ndarray, cell: Cell | FoundCell, frame: float = 2.0, out_size: int | None = None) -> np.ndarray:
    """Square crop centred on the cell box with side = frame x cell equivalent diameter.

    Outside the picture the crop is filled with the estimated background colour (not black,
    not reflected: both would invent structure). Resized to out_size if given."""
    image = np.asarray(image)[..., :3]
    h, w = image.shape[:2]
    cx, cy = cell.centre
    side = max(8, int(round(frame * cell.diameter)))
    x0 = int(round(cx - side / 2))
    y0 = int(round(cy - side / 2))
    bg = background_colour(image).round().astype(np.uint8)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = bg
    sx0, sy0 = max(0, x0), max(0, y0)
    sx1, sy1 = min(w, x0 + side), min(h, y0 + side)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0: sy1 - y0, sx0 - x0: sx1 - x0] = image[sy0:sy1, sx0:sx1]
    pad = padding_bands(image)
    if pad.any():  # replace black padding inside the crop too
        pm = np.zeros((side, side), bool)
        pm[sy0 - y0: sy1 - y0, sx0 - x0: sx1 - x0] = pad[sy0:sy1, sx0:sx1]
        out[pm] = bg
    if out_size and out_size != side:
        t = torch.from_numpy(out).permute(2, 0, 1)[None].float()
        t = F.interpolate(t, size=(out_size, out_size), mode="bilinear", align_corners=False,
                          antialias=out_size < side)
        out = t[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    return out


# ----------------------------------------------------------------------------- remembered findings
@dataclass(frozen=True)
class FoundCell(_CellGeometry):
    """What framing needs of a found cell (no masks): its box, area, whether the picture's edge cuts it."""

    box: tuple[int, int, int, int]
    area: int
    touches_border: bool


_FINDINGS: dict[str, tuple[list[FoundCell], int | None]] = {}
_FINDINGS_MAX = 50_000


def _findings_db() -> Any:
    """SQLite file of findings per picture content for this segmenter (caches of several sizes and split
    lists share it, so each picture is segmented once)."""
    import sqlite3

    from hemaclip.cache import cache_dir

    folder = cache_dir() / "cells"
    folder.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(folder / f"findings-{segmenter_id()}.sqlite", timeout=60)
    db.execute("CREATE TABLE IF NOT EXISTS findings (key TEXT PRIMARY KEY, cells TEXT NOT NULL)")
    return db


def locate_cells(image: np.ndarray, remember: bool = True) -> tuple[list[FoundCell], int | None]:
    """The white cells of an RGB uint8 picture (:func:`find_cells`) and the index of its primary cell
    (:func:`primary_cell`), remembered by picture content: a picture already seen (any cache size, any
    split list) is not segmented again."""
    import hashlib
    import json

    image = np.ascontiguousarray(np.asarray(image)[..., :3])
    key = hashlib.blake2b(image.tobytes(), digest_size=20, person=str(image.shape).encode()[:16]).hexdigest()
    if remember and key in _FINDINGS:
        return _FINDINGS[key]
    row = None
    if remember:
        try:
            db = _findings_db()
            try:
                row = db.execute("SELECT cells FROM findings WHERE key = ?", (key,)).fetchone()
            finally:
                db.close()
        except Exception:  # an unreadable cache only costs time
            row = None
    if row is not None:
        doc = json.loads(row[0])
        result = ([FoundCell(tuple(c[0]), int(c[1]), bool(c[2])) for c in doc["cells"]], doc["primary"])
    else:
        cells = find_cells(image)
        primary = primary_cell(cells, image.shape[:2])
        found = [FoundCell(tuple(int(v) for v in c.box), int(c.area), bool(c.touches_border)) for c in cells]
        result = (found, None if primary is None else next(i for i, c in enumerate(cells) if c is primary))
        if remember:
            payload = json.dumps({"cells": [[list(c.box), c.area, c.touches_border] for c in found], "primary": result[1]})
            try:
                db = _findings_db()
                try:
                    with db:
                        db.execute("INSERT OR REPLACE INTO findings VALUES (?, ?)", (key, payload))
                finally:
                    db.close()
            except Exception:
                pass
    if remember:
        if len(_FINDINGS) >= _FINDINGS_MAX:
            _FINDINGS.clear()
        _FINDINGS[key] = result
    return result
