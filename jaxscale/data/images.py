"""Labelled images for classification: sources, training augmentation and the pipelines.

Every source gives random-access records ``{"images": float32 [H, W, C], "labels": int32}`` at
the task's example shape (bilinear resize to H x W, grayscale <-> RGB as C asks), read a batch at
a time (`batch(ids)`), keyed by ``data.source`` in `SOURCES`:

  digits        scikit-learn's bundled handwritten digits (1,797 8x8 images, values 0..16; no
                download), standardised with the training split's mean and std. The held-out
                split is fixed: the ceil(val_fraction * 1797) images whose crc32 of "digits/<i>"
                is lowest (0.02: 36 held out, 1,761 train; 0.1: 180 / 1,617; 0.2: 360 / 1,437).
  image_folder  ``data.path/<class>/*.png|*.jpg|*.jpeg``; classes sorted by folder name are labels
                0..K-1. Files are decoded with Pillow when read (in the pipeline's reader
                threads), scaled to [-1, 1]. A file is held out when the crc32 of its path
                relative to data.path falls in the lowest val_fraction of the key space (as
                text documents are), so adding files never moves the others between splits.
  npz           ``data.path`` holding ``images`` [N, H, W] or [N, H, W, C] (uint8 or float) and
                ``labels`` [N]; ``val_images``/``val_labels`` are the held-out split if present,
                otherwise the fixed split of digits (by "npz/<i>"). Standardised like digits.
  synthetic     `SyntheticClasses`: noise labelled by a random linear teacher.

None of the splits depends on the run's seed, so evaluations of runs with any seed compare.

Augmentation (training only; `Augmented`): a random crop after zero-padding each side by
``data.crop_padding``, a random horizontal flip with ``data.flip``, and mixup with weights drawn
from Beta(``data.mixup``, ``data.mixup``). The pipeline reads augmented records with the stream
position of every row (`Augmented.batch_at`), and each row's draws come from a generator seeded
by (seed, position) alone: an image seen in two epochs gets two crops, and a batch is the same
whatever the thread, process or device count. Mixup mixes the rows of each pair (2i, 2i+1) of the
global batch (whose records the index shuffle makes random): row 2i becomes
``w * x[2i] + (1 - w) * x[2i+1]`` with its own w, and carries the partner's label as
``mix_labels`` and w as ``mix_weight``. A pair never straddles two processes as long as each
process holds an even number of rows starting at an even row, which `pipelines` checks.

Shapes: N images of a source, B rows of a batch, H x W pixels, C channels.
"""

from __future__ import annotations

import functools
import math
import pathlib
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxscale.data.documents import document_key, split_documents
from jaxscale.data.sources import SyntheticClasses, _Batched
from jaxscale.errors import ConfigError

Record = dict[str, np.ndarray]
Shape = tuple[int, ...]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LAYOUT = "data.path/<class name>/*.png|*.jpg|*.jpeg"
# channels of task.input_shape -> the Pillow mode image files are converted to
PIL_MODES = {1: "L", 3: "RGB"}
# ITU-R 601-2 luma, the weights of Pillow's RGB -> "L" conversion
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# Mixed into the augmentation generators' seeds: their draws differ from any other use of the seed.
AUGMENT_STREAM = 0x61756721


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def _check_shape(shape: Shape) -> None:
    if len(shape) != 3 or shape[2] not in PIL_MODES:
        raise ConfigError(
            f"task.input_shape={list(shape)} is not [H, W, C] with C = 1 (grayscale) or 3 (RGB), "
            "which image sources give")


# --------------------------------------------------------------------------------------------
# Images in memory: digits and npz.

def resize(images_NHWC: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of float32 images (Pillow's, channel by channel; a no-op at H x W)."""
    from PIL import Image

    N, H, W, C = images_NHWC.shape
    if (H, W) == (height, width):
        return images_NHWC
    out_NHWC = np.empty((N, height, width, C), np.float32)
    for n in range(N):
        for c in range(C):
            plane = Image.fromarray(np.ascontiguousarray(images_NHWC[n, :, :, c], np.float32))
            out_NHWC[n, :, :, c] = np.asarray(plane.resize((width, height), Image.BILINEAR))
    return out_NHWC


def to_channels(images_NHWC: np.ndarray, channels: int, where: str) -> np.ndarray:
    """Grayscale images repeated to RGB, or RGB images reduced to their luma."""
    have = images_NHWC.shape[-1]
    if have == channels:
        return images_NHWC
    if have == 1:
        return np.repeat(images_NHWC, channels, axis=-1)
    if have == 3 and channels == 1:
        return (images_NHWC @ LUMA)[..., None]
    raise ConfigError(f"{where} holds images of {have} channels, which cannot become the "
                      f"{channels} of task.input_shape")


def held_out_rows(n: int, val_fraction: float, name: str) -> np.ndarray:
    """The fixed held-out split of `n` images in memory: the ceil(val_fraction * n) (at least one,
    and one fewer than n at most) whose crc32 of "<name>/<i>" is lowest."""
    keys = np.array([document_key(f"{name}/{i}") for i in range(n)], np.int64)
    count = min(max(math.ceil(val_fraction * n), 1), n - 1)
    held = np.zeros(n, bool)
    held[np.argsort(keys, kind="stable")[:count]] = True
    return held


class ImageArrays(_Batched):
    """Images and labels held in memory."""

    def __init__(self, images_NHWC: np.ndarray, labels_N: np.ndarray):
        self.images_NHWC = np.ascontiguousarray(images_NHWC, np.float32)
        self.labels_N = np.asarray(labels_N, np.int32)
        self._len = len(self.labels_N)

    def batch(self, indices: np.ndarray) -> Record:
        indices = np.asarray(indices, np.int64)
        return {"images": self.images_NHWC[indices], "labels": self.labels_N[indices]}


def in_memory(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
              shape: Shape, where: str) -> tuple[ImageArrays, ImageArrays]:
    """(train, held-out) records of [N, H', W', C'] images at `shape`, standardised per channel
    with the training split's mean and std (so the zero padding of crops is the mean image)."""
    H, W, C = shape
    images = [to_channels(resize(np.asarray(x, np.float32), H, W), C, where)
              for x, _ in (train, val)]
    mean_C = images[0].mean(axis=(0, 1, 2))
    std_C = np.maximum(images[0].std(axis=(0, 1, 2)), 1e-6)
    return tuple(ImageArrays((x - mean_C) / std_C, labels)
                 for x, (_, labels) in zip(images, (train, val), strict=True))


@functools.cache
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images [1797, 8, 8, 1] float32 in [0, 1] and labels [1797] int32
    (read once per process: importing scikit-learn takes seconds)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32)[..., None], digits.target.astype(np.int32)


def _digits(cfg: Any, shape: Shape, num_classes: int) -> tuple[Any, Any]:
    if num_classes != 10:
        raise ConfigError(
            f"data.source='digits' holds 10 classes but task.num_classes={num_classes}")
    images_NHWC, labels_N = digits_arrays()
    held = held_out_rows(len(labels_N), cfg.data.val_fraction, "digits")
    return in_memory((images_NHWC[~held], labels_N[~held]), (images_NHWC[held], labels_N[held]),
                     shape, "data.source='digits'")


def _npz_pair(arrays: Any, prefix: str, where: str, num_classes: int):
    """(images [N, H, W, C], labels [N]) of arrays `<prefix>images`, `<prefix>labels`, checked."""
    images, labels = arrays[f"{prefix}images"], arrays[f"{prefix}labels"]
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ConfigError(f"{where}: {prefix}images has shape {list(images.shape)}; it must be "
                          "[N, H, W] or [N, H, W, C]")
    if labels.shape != images.shape[:1]:
        raise ConfigError(f"{where}: {prefix}labels has shape {list(labels.shape)} but "
                          f"{prefix}images holds {len(images)} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"{where}: {prefix}labels has dtype {labels.dtype}; class ids must be "
                          "integers")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(
            f"{where}: {prefix}labels hold values in [{labels.min()}, {labels.max()}] but "
            f"task.num_classes={num_classes} needs them in [0, {num_classes})")
    return images, labels


def _npz(cfg: Any, shape: Shape, num_classes: int) -> tuple[Any, Any]:
    where = f"data.path={cfg.data.path!r}"
    if not pathlib.Path(cfg.data.path).is_file():
        raise ConfigError(f"{where} is not a file; npz reads a .npz file of arrays")
    try:
        arrays = np.load(cfg.data.path)  # pickled objects are refused
    except (OSError, ValueError, EOFError):
        arrays = None
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise ConfigError(f"{where} cannot be read as a .npz file of arrays (numpy.savez)")
    with arrays:
        have = sorted(arrays.files)
        for key in ("images", "labels"):
            if key not in have:
                raise ConfigError(
                    f"{where} has no {key!r} array (it holds: {', '.join(have) or 'none'}); it "
                    "needs images [N, H, W] or [N, H, W, C] and labels [N]")
        if ("val_images" in have) != ("val_labels" in have):
            given, missing = (("val_images", "val_labels") if "val_images" in have
                              else ("val_labels", "val_images"))
            raise ConfigError(f"{where} has {given!r} but no {missing!r}: give both, or neither "
                              "to hold out data.val_fraction of the images")
        images, labels = _npz_pair(arrays, "", where, num_classes)
        if "val_images" in have:
            train, val = (images, labels), _npz_pair(arrays, "val_", where, num_classes)
        else:
            held = held_out_rows(len(labels), cfg.data.val_fraction, "npz")
            train, val = (images[~held], labels[~held]), (images[held], labels[held])
    return in_memory(train, val, shape, where)


# --------------------------------------------------------------------------------------------
# Image files: image_folder.

class ImageFiles(_Batched):
    """Image files decoded with Pillow when read, resized to H x W, C channels, in [-1, 1].

    A file that cannot be decoded fails the read with a one-line `ConfigError` naming it. Files
    are not opened when the source is built (a large folder would take minutes); the pipeline's
    fingerprint decodes three of them at once, and the rest are checked when first read.
    """

    def __init__(self, root: str, files: list[str], labels_N: np.ndarray, shape: Shape):
        self.root, self.files, self.shape = root, files, tuple(shape)
        self.labels_N = np.asarray(labels_N, np.int32)
        self._len = len(files)
        # The file list is what defines the records; three decoded files would miss most edits.
        listing = "\n".join(files).encode()
        self.settings = f"files:{zlib.crc32(listing):08x}"

    def decode(self, index: int) -> np.ndarray:
        """File `index` as float32 [H, W, C]."""
        from PIL import Image

        H, W, C = self.shape
        path = pathlib.Path(self.root) / self.files[index]
        try:
            with Image.open(path) as image:
                # JPEGs decode at the smallest scale (1/2, 1/4, 1/8) still at least H x W: large
                # photos then decode several times faster. Other formats ignore it.
                image.draft(PIL_MODES[C], (W, H))
                pixels = image.convert(PIL_MODES[C]).resize((W, H), Image.BILINEAR)
        except (OSError, SyntaxError, ValueError) as e:
            raise ConfigError(f"data.path={self.root!r}: cannot read image '{path}' "
                              f"({_first_line(e)})") from None
        return (np.asarray(pixels, np.float32) / 127.5 - 1.0).reshape(H, W, C)

    def batch(self, indices: np.ndarray) -> Record:
        indices = np.asarray(indices, np.int64)
        return {"images": np.stack([self.decode(int(i)) for i in indices]),
                "labels": self.labels_N[indices]}


def image_files(path: str, num_classes: int) -> tuple[list[str], np.ndarray]:
    """The image files under `path`/<class>/ (relative paths) and their labels, checked."""
    where = f"data.path={path!r}"
    root = pathlib.Path(path)
    if not root.is_dir():
        raise ConfigError(f"{where} is not a directory; image_folder reads {LAYOUT}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"{where} has no class folders; image_folder reads {LAYOUT}")
    if len(classes) != num_classes:
        shown = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
        raise ConfigError(f"{where} has {len(classes)} class folders ({shown}) but "
                          f"task.num_classes={num_classes}")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p.name for p in (root / name).iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                       and p.is_file())
        if not found:
            raise ConfigError(f"{where}: class folder {name!r} has no images "
                              f"({', '.join(IMAGE_SUFFIXES)})")
        files += [f"{name}/{f}" for f in found]
        labels += [label] * len(found)
    return files, np.array(labels, np.int32)


def _image_folder(cfg: Any, shape: Shape, num_classes: int) -> tuple[Any, Any]:
    files, labels = image_files(cfg.data.path, num_classes)
    held = split_documents([document_key(f) for f in files], cfg.data.val_fraction)
    return tuple(
        ImageFiles(cfg.data.path, [f for f, h in zip(files, held, strict=True) if h == side],
                   labels[held == side], shape)
        for side in (False, True))


def _synthetic(cfg: Any, shape: Shape, num_classes: int) -> tuple[Any, Any]:
    common = dict(input_shape=shape, num_classes=num_classes, seed=cfg.seed)
    return SyntheticClasses(**common), SyntheticClasses(**common, split=1)


# data.source -> fn(cfg, example shape, num_classes) -> (train records, held-out records)
SOURCES: dict[str, Callable[[Any, Shape, int], tuple[Any, Any]]] = {
    "digits": _digits,
    "image_folder": _image_folder,
    "npz": _npz,
    "synthetic": _synthetic,
}
# sources that need an [H, W, C] shape with 1 or 3 channels (synthetic takes any shape)
_IMAGES_ONLY = ("digits", "image_folder", "npz")


# --------------------------------------------------------------------------------------------
# Augmentation.

def crop(images_BHWC: np.ndarray, dy_B: np.ndarray, dx_B: np.ndarray,
         padding: int) -> np.ndarray:
    """Each image zero-padded by `padding` on every side, then cut at (dy, dx) to H x W."""
    if padding == 0:
        return images_BHWC
    B, H, W, _ = images_BHWC.shape
    padded = np.pad(images_BHWC, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows_BH = dy_B[:, None] + np.arange(H)
    cols_BW = dx_B[:, None] + np.arange(W)
    return padded[np.arange(B)[:, None, None], rows_BH[:, :, None], cols_BW[:, None, :]]


class Augmented(_Batched):
    """Training records of `base`, augmented as a pure function of (seed, stream position).

    `DataPipeline` reads them with `batch_at(positions, ids)`. `[i]` and `batch(ids)` give the
    records unaugmented (mixed with themselves, weight 1, when they carry the mixup fields): that
    is what the pipeline reads the batch's shapes and its fingerprint from.
    """

    def __init__(self, base: Any, seed: int, crop_padding: int = 0, flip: bool = False,
                 mixup: float = 0.0, mix_fields: bool | None = None):
        self.base, self.seed = base, seed
        self.crop_padding, self.flip, self.mixup = crop_padding, flip, mixup
        self.mix_fields = mixup > 0 if mix_fields is None else mix_fields
        self._len = len(base)
        self.settings = (f"{getattr(base, 'settings', '')}|crop_padding={crop_padding},"
                         f"flip={flip},mixup={mixup},mix_fields={self.mix_fields}")

    def draws(self, positions: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per row: crop offsets dy_B, dx_B in [0, 2 * crop_padding], flip_B, mixup weight_B.

        All are drawn whatever the settings, so turning one augmentation on or off leaves the
        others' draws unchanged.
        """
        B = len(positions)
        dy_B, dx_B = np.empty(B, np.int64), np.empty(B, np.int64)
        flip_B, weight_B = np.empty(B, bool), np.ones(B, np.float32)
        for i, position in enumerate(positions):
            rng = np.random.default_rng([self.seed, AUGMENT_STREAM, int(position)])
            dy_B[i], dx_B[i] = rng.integers(0, 2 * self.crop_padding + 1, size=2)
            flip_B[i] = rng.random() < 0.5
            if self.mixup > 0:
                weight_B[i] = rng.beta(self.mixup, self.mixup)
        return dy_B, dx_B, flip_B & self.flip, weight_B

    def batch(self, indices: np.ndarray) -> Record:
        record = self.base.batch(indices)
        if self.mix_fields:
            record["mix_labels"] = record["labels"].copy()
            record["mix_weight"] = np.ones(len(record["labels"]), np.float32)
        return record

    def batch_at(self, positions: np.ndarray, ids: np.ndarray) -> Record:
        """Records `ids` read at stream `positions`, augmented (mixup: positions come in pairs
        (2i, 2i+1))."""
        positions = np.asarray(positions, np.int64)
        if not (self.crop_padding or self.flip or self.mixup > 0):
            return self.batch(ids)
        record = self.base.batch(ids)
        dy_B, dx_B, flip_B, weight_B = self.draws(positions)
        images_BHWC = crop(record["images"], dy_B, dx_B, self.crop_padding)
        images_BHWC = np.where(flip_B[:, None, None, None], images_BHWC[:, :, ::-1], images_BHWC)
        labels_B = record["labels"]
        if self.mixup > 0:
            partner_B = np.arange(len(positions)) ^ 1
            if len(positions) % 2 or np.any(positions[partner_B] != positions ^ 1):
                raise ValueError(f"mixup mixes rows in pairs (2i, 2i+1) of the stream, but the "
                                 f"rows read are at positions {positions[0]}..{positions[-1]}")
            w_B111 = weight_B[:, None, None, None]
            images_BHWC = w_B111 * images_BHWC + (1.0 - w_B111) * images_BHWC[partner_B]
            return {"images": images_BHWC, "labels": labels_B,
                    "mix_labels": labels_B[partner_B], "mix_weight": weight_B}
        out = {"images": images_BHWC, "labels": labels_B}
        if self.mix_fields:
            out["mix_labels"], out["mix_weight"] = labels_B.copy(), weight_B
        return out


# --------------------------------------------------------------------------------------------
# Pipelines.

def sources(cfg: Any, input_shape: Shape, num_classes: int) -> tuple[Any, Any]:
    """The (training, held-out) records of `cfg.data.source`, the training ones augmented (with
    the run's seed) when data.crop_padding, data.flip or data.mixup asks.

    With mixup, the held-out records carry ``mix_labels`` = ``labels`` and ``mix_weight`` = 1,
    so that both splits fill the same batch fields.
    """
    from jaxscale.validation import choices_error

    d, shape = cfg.data, tuple(input_shape)
    if d.source not in SOURCES:
        raise choices_error("data.source", d.source, list(SOURCES))
    if d.source in _IMAGES_ONLY:
        _check_shape(shape)
    if (d.crop_padding or d.flip) and len(shape) != 3:
        raise ConfigError(f"data.crop_padding={d.crop_padding} and data.flip={d.flip} crop and "
                          f"flip images [H, W, C], but task.input_shape={list(shape)}")
    train, held_out = SOURCES[d.source](cfg, shape, num_classes)
    for split, records in (("training", train), ("held-out", held_out)):
        if len(records) == 0:
            raise ConfigError(f"data.source={d.source!r} data.path={d.path!r} has no {split} "
                              f"images (data.val_fraction={d.val_fraction})")
    if d.crop_padding or d.flip or d.mixup > 0:
        train = Augmented(train, cfg.seed, crop_padding=d.crop_padding, flip=d.flip,
                          mixup=d.mixup)
    if d.mixup > 0:
        held_out = Augmented(held_out, cfg.seed, mix_fields=True)
    return train, held_out


def pipelines(cfg: Any, input_shape: Shape, num_classes: int,
              shardings: dict[str, Any]) -> tuple[Any, Any]:
    """The (training, evaluation) pipelines of labelled images for `cfg.data.source`.

    The training pipeline is shuffled with the run's seed (unless data.shuffle=false) and
    augmented; the evaluation one reads the held-out split unaugmented, shuffled with `EVAL_SEED`
    (so eval batches are the same in every run). Batch fields: images, labels, and with
    data.mixup > 0, mix_labels and mix_weight.

    Args:
      cfg: the run's config (data.*, seed, batch_size, workdir).
      input_shape: one example's shape (the task's, after any compound scaling).
      num_classes: the task's number of labels.
      shardings: the batch sharding of every field (`Run.batch_shardings`).

    Raises:
      ConfigError: the data does not fit the task, or mixup's row pairs would straddle
        two processes.
    """
    import jax

    from jaxscale.data import EVAL_SEED
    from jaxscale.data.pipeline import DataPipeline

    train, held_out = sources(cfg, input_shape, num_classes)
    d = cfg.data
    common = dict(global_batch=cfg.batch_size, sharding=shardings, num_threads=d.num_threads,
                  prefetch=d.prefetch)
    row_log = None
    if d.log_rows:
        row_log = f"{cfg.workdir}/data_rows/process-{jax.process_index():05d}.jsonl"
    training = DataPipeline(train, seed=cfg.seed, shuffle=d.shuffle, row_log=row_log, **common)
    rows = training.rows
    if d.mixup > 0 and (rows.start % 2 or rows.stop % 2):
        raise ConfigError(
            f"data.mixup={d.mixup} mixes rows in pairs (2i, 2i+1), but this process holds rows "
            f"{rows.start}..{rows.stop - 1} of batch_size={cfg.batch_size}; give each process an "
            "even number of rows")
    return training, DataPipeline(held_out, seed=EVAL_SEED, shuffle=True, **common)
