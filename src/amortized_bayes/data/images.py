"""A user's own images, read for a fitted model: an ``.npy`` or ``.npz`` array, an IDX file (raw or
gzipped) or a folder of PNGs, checked against the model's image shape and likelihood.

Pixel values: ``uint8`` arrays and PNGs are intensities 0-255 and are divided by 255; any other array
must already hold values in [0, 1] (a Gaussian run) or in {0, 1} (a Bernoulli run, which may instead
ask for a threshold). Every problem is one :class:`ImageInputError` naming the file and what is wrong;
nothing here touches torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import numpy as np

from .errors import DataError, ImageInputError
from .idx import read_idx

Note = Callable[[str], None]
PNG_SUFFIXES = (".png",)


@dataclass(frozen=True)
class ImageBatch:
    """Images ready for a model: ``pixels`` float32 (M, H, W) in [0, 1] (or {0, 1}); ``names`` (M,)
    where each image came from (a PNG's file name or ``FILE[i]``); ``resized``: PNGs scaled to (H, W)."""

    pixels: np.ndarray
    names: tuple[str, ...]
    source: str
    resized: int = 0

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


def _quiet(message: str) -> None:
    pass


def _read_png(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """One PNG as uint8 (H, W) grey; resized (Lanczos) when its own size differs. Returns (pixels, resized)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            grey = image.convert("L")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ImageInputError(f"{path}: not a readable PNG image ({exc})") from None
    height, width = shape
    resized = grey.size != (width, height)
    if resized:
        grey = grey.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(grey, dtype=np.uint8), resized


def _read_array(path: Path, key: str | None) -> np.ndarray:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                if key is None:
                    if "images" in names:
                        key = "images"
                    elif len(names) == 1:
                        key = names[0]
                    else:
                        raise ImageInputError(f"{path}: holds several arrays ({', '.join(names)}) and none is "
                                              "called 'images'; name one with --key")
                if key not in names:
                    raise ImageInputError(f"{path}: has no array {key!r} (it holds {', '.join(names) or 'none'})")
                return archive[key]
    except ImageInputError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        # allow_pickle=False refuses object arrays (they would run code on load): said so here.
        raise ImageInputError(f"{path}: not a readable {suffix} array ({exc})") from None
    try:
        return read_idx(path)
    except DataError as exc:
        raise ImageInputError(f"{path}: not an .npy, .npz, PNG or IDX file ({exc})") from None


def _as_images(array: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    """(M, H, W) from (M, H, W), (M, H*W), (M, 1, H, W), (M, H, W, 1) or one (H, W) or (H*W,) image."""
    height, width = shape
    a = array
    if a.ndim == 1 and a.shape[0] == height * width:
        a = a.reshape(1, height, width)
    elif a.ndim == 2 and a.shape == (height, width) and a.shape[1] != height * width:
        a = a[None]
    elif a.ndim == 2 and a.shape[1] == height * width:
        a = a.reshape(a.shape[0], height, width)
    elif a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim == 4 and a.shape[3] == 1:
        a = a[..., 0]
    if a.ndim != 3 or a.shape[1:] != (height, width):
        raise ImageInputError(f"{name}: an array of shape {tuple(array.shape)} is not {height}x{width} images; "
                              f"expected (N, {height}, {width}), (N, {height * width}) or one ({height}, {width})")
    return a


def _to_unit_interval(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype.kind not in "iuf":
        raise ImageInputError(f"{name}: pixels of type {a.dtype} are not numbers")
    out = a.astype(np.float32)
    bad = int((~np.isfinite(out)).sum())
    if bad:
        raise ImageInputError(f"{name}: {bad} pixel values are NaN or infinite")
    return out


def check_pixels(pixels: np.ndarray, likelihood: str, name: str) -> None:
    """Refuse values the model's likelihood cannot score: outside [0, 1] for the Gaussian, anything but
    0 and 1 for the Bernoulli."""
    if likelihood == "bernoulli":
        bad = int(((pixels != 0) & (pixels != 1)).sum())
        if bad:
            raise ImageInputError(f"{name}: the run models binary pixels (Bernoulli likelihood) and {bad} values "
                                  "are neither 0 nor 1; binarise them (--binarize 0.5 sets x > 0.5 to 1)")
        return
    bad = int(((pixels < 0) | (pixels > 1)).sum())
    if bad:
        raise ImageInputError(f"{name}: {bad} pixel values lie outside [0, 1] (min {pixels.min():.4g}, max "
                              f"{pixels.max():.4g}); scale them to [0, 1] (uint8 arrays are divided by 255 "
                              "automatically)")


def read_images(path: str | Path, shape: tuple[int, int], *, likelihood: str = "gaussian",
                key: str | None = None, invert: bool = False, binarize: float | None = None,
                note: Note = _quiet) -> ImageBatch:
    """Read ``path`` (an ``.npy``/``.npz`` array, an IDX file, one PNG or a folder of PNGs) as images of
    ``shape`` (H, W) for a model with ``likelihood``.

    ``key``: the array of an ``.npz`` to read (default: ``images``, or its only array). ``invert``: use
    1 - x (dark strokes on a light background, as photographed, become MNIST's light on dark).
    ``binarize``: set x > threshold to 1 and the rest to 0 (after ``invert``). PNGs of another size are
    resized with a note; arrays of another shape are refused.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ImageInputError(f"{path}: no such file or folder")
    resized = 0
    if path.is_dir() or path.suffix.lower() in PNG_SUFFIXES:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in PNG_SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise ImageInputError(f"{path}: a folder with no .png files")
        images = []
        for file in files:
            pixels, was_resized = _read_png(file, shape)
            images.append(pixels)
            resized += was_resized
        if resized:
            note(f"warning: {resized} of {len(files)} PNG images were not {shape[0]}x{shape[1]} and were resized "
                 "to it (Lanczos)")
        raw = np.stack(images)
        names = tuple(p.name for p in files)
    else:
        raw = _as_images(_read_array(path, key), shape, str(path))
        names = tuple(f"{path.name}[{i}]" for i in range(raw.shape[0]))
    if raw.shape[0] == 0:
        raise ImageInputError(f"{path}: holds no images")
    pixels = _to_unit_interval(raw, str(path))
    if invert:
        pixels = 1.0 - pixels
    if binarize is not None:
        if not 0.0 <= binarize < 1.0:
            raise ImageInputError(f"the binarisation threshold must be in [0, 1), got {binarize}")
        pixels = (pixels > binarize).astype(np.float32)
    check_pixels(pixels, likelihood, str(path))
    return ImageBatch(np.ascontiguousarray(pixels, dtype=np.float32), names, str(path), resized)


def pairs_grid(top: np.ndarray, bottom: np.ndarray, columns: int = 16, pad: int = 2) -> np.ndarray:
    """A uint8 grey picture of images (M, H, W) in [0, 1]: ``top[i]`` above ``bottom[i]`` in column
    i mod ``columns``, row pairs stacked, ``pad`` pixels of mid-grey between images."""
    if top.shape != bottom.shape or top.ndim != 3 or top.shape[0] == 0:
        raise ValueError(f"top and bottom must be the same non-empty (M, H, W), got {top.shape} and {bottom.shape}")
    m, h, w = top.shape
    columns = max(1, min(columns, m))
    rows = -(-m // columns)
    canvas = np.full((rows * 2 * (h + pad) + pad, columns * (w + pad) + pad), 128, dtype=np.uint8)
    for i in range(m):
        r, c = divmod(i, columns)
        x0, y0 = pad + c * (w + pad), pad + r * 2 * (h + pad)
        for j, source in enumerate((top, bottom)):
            y = y0 + j * (h + pad)
            canvas[y:y + h, x0:x0 + w] = np.rint(np.clip(source[i], 0.0, 1.0) * 255.0).astype(np.uint8)
    return canvas


def png_bytes(picture: np.ndarray) -> bytes:
    """A uint8 (H, W) grey picture as PNG file contents."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(picture, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()
