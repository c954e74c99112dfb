"""Image data: a folder of PNGs trained on through the framework with the labels of its folders,
per-process rows that make the global batch, augmentation that is a pure function of (seed,
stream position) checked by hand (crops, flips, mixup), iterator resumes, the fixed digits split,
and every bad input's one-line error."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding
from PIL import Image

from jaxscale import config as config_lib
from jaxscale.data import EVAL_SEED, images
from jaxscale.data.pipeline import DataPipeline
from jaxscale.errors import ConfigError
from jaxscale.run.build import build
from jaxscale.validation import IMAGE_SOURCES

CLASSIFY = ["model.name=resnet", "model.blocks=[1]", "model.width=8", "model.stem=small",
            "task.name=classify", "progress=false"]
ONE_DEVICE = SingleDeviceSharding(jax.devices()[0])


def _cfg(*overrides, classes=10, shape="[8,8,1]", source="digits"):
    return config_lib.load("tiny", [
        *CLASSIFY, f"model.num_classes={classes}", f"task.num_classes={classes}",
        f"task.input_shape={shape}", f"data.source={source}", *overrides])


def _write_folder(root, classes=("ant", "bee", "cat"), per_class=6, size=12):
    """PNGs whose colour says their class: class k is brightest in channel k, plus noise."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 100, (size, size, 3))
            pixels[..., k % 3] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:02d}.png")
    return root


def _by_hand(path, H, W):
    """A file decoded as the source is documented to: RGB, bilinear to W x H, to [-1, 1]."""
    with Image.open(path) as image:
        pixels = image.convert("RGB").resize((W, H), Image.BILINEAR)
    return np.asarray(pixels, np.float32) / 127.5 - 1.0


def test_sources_table_matches_the_classify_choices():
    assert tuple(images.SOURCES) == IMAGE_SOURCES
    assert set(IMAGE_SOURCES) <= set(config_lib.DATA_SOURCES)


# --------------------------------------------------------------------------------------------
# 1. A folder of PNGs trained on through the framework.

def test_image_folder_trains_with_the_labels_of_its_folders(tmp_path):
    root = _write_folder(tmp_path / "pngs")
    cfg = _cfg("data.source=image_folder", f"data.path={root}", "data.val_fraction=0.25",
               "batch_size=8", "optim.warmup_steps=0", "optim.lr=0.01", classes=3,
               shape="[8,8,3]")
    run = build(cfg)
    train, held_out = images.pipelines(run.cfg, run.task.input_shape, run.task.num_classes,
                                       run.batch_shardings)
    records = train.records
    assert isinstance(records, images.ImageFiles)
    assert len(records) + len(held_out.records) == 18
    assert not set(records.files) & set(held_out.records.files)  # disjoint splits
    assert held_out.seed == EVAL_SEED and held_out.shuffle
    state = run.init_state()
    losses = []
    for step in range(5):
        batch = train.batch(step)
        ids = train.record_ids(step)
        folders = [records.files[i].split("/")[0] for i in ids]
        expected_labels = [["ant", "bee", "cat"].index(f) for f in folders]
        np.testing.assert_array_equal(np.asarray(batch["labels"]), expected_labels)
        expected = np.stack([_by_hand(root / records.files[i], 8, 8) for i in ids])
        np.testing.assert_array_equal(np.asarray(batch["images"]), expected)
        state, metrics = run.train_step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses


def test_augmented_digits_with_mixup_fill_the_tasks_batch_and_train():
    cfg = _cfg("data.crop_padding=1", "data.mixup=0.4", "batch_size=16", "optim.warmup_steps=0")
    run = build(cfg)
    train, held_out = images.pipelines(run.cfg, run.task.input_shape, run.task.num_classes,
                                       run.batch_shardings)
    state = run.init_state()
    for step in range(3):
        batch = train.batch(step)
        assert set(batch) == set(run.batch_spec) == set(held_out.batch(step))
        state, metrics = run.train_step(state, batch, jax.random.key(0))
        assert np.isfinite(float(metrics["loss"]))


# --------------------------------------------------------------------------------------------
# 2. Per-process rows.

AUGMENT = ["data.crop_padding=2", "data.flip=true", "data.mixup=0.4"]


def test_processes_read_disjoint_rows_that_make_the_single_process_batch():
    train, _ = images.sources(_cfg(*AUGMENT, "data.val_fraction=0.2"), (8, 8, 1), 10)
    whole = DataPipeline(train, global_batch=8, sharding=ONE_DEVICE, seed=3)
    halves = [DataPipeline(train, global_batch=8, sharding=ONE_DEVICE, seed=3, rows=rows)
              for rows in (slice(0, 4), slice(4, 8))]
    assert whole.rows == slice(0, 8)
    for step in (0, 1, 7, 250):  # 250 x 8 rows: past the first epoch of 1,437 images
        parts = [h.local_batch(step) for h in halves]
        ids = [h.record_ids(step) for h in halves]
        assert not set(ids[0]) & set(ids[1])
        np.testing.assert_array_equal(np.concatenate(ids), whole.record_ids(step))
        full = whole.local_batch(step)
        assert set(full) == {"images", "labels", "mix_labels", "mix_weight"}
        for key, value in full.items():
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)


# --------------------------------------------------------------------------------------------
# 3. Augmentation: a pure function of (seed, stream position), checked by hand.

def _augmented(seed=0, **settings):
    base, _ = images.sources(_cfg("data.val_fraction=0.2"), (8, 8, 1), 10)
    return base, images.Augmented(base, seed, **settings)


def test_same_seed_and_step_give_equal_batches_on_any_thread_count():
    cfg = _cfg(*AUGMENT, "seed=5", "batch_size=16")
    sharding = dict.fromkeys(["images", "labels", "mix_labels", "mix_weight"], ONE_DEVICE)
    batches = []
    for threads in (1, 4):
        train, _ = images.pipelines(dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, num_threads=threads)), (8, 8, 1), 10,
            sharding)
        it = train.iterator()
        batches.append([{k: np.asarray(v) for k, v in next(it).items()} for _ in range(4)])
        it.close()
    for a, b in zip(*batches, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(batches[0][0]["images"], batches[0][1]["images"])


def test_other_seeds_and_positions_give_other_crops():
    ids = np.arange(16)
    base, aug = _augmented(seed=0, crop_padding=2)
    same_seed = images.Augmented(base, 0, crop_padding=2).batch_at(np.arange(16), ids)
    np.testing.assert_array_equal(aug.batch_at(np.arange(16), ids)["images"],
                                  same_seed["images"])
    other_seed = images.Augmented(base, 1, crop_padding=2).batch_at(np.arange(16), ids)
    other_step = aug.batch_at(np.arange(16) + 16, ids)  # the next step's positions
    for other in (other_seed, other_step):
        differ = [not np.array_equal(a, b)
                  for a, b in zip(same_seed["images"], other["images"], strict=True)]
        assert sum(differ) >= 12, differ
    # One record read at 32 stream positions (epochs): many different crops of it.
    seen = aug.batch_at(np.arange(32), np.full(32, 7))["images"]
    assert len({x.tobytes() for x in seen}) >= 15
    dy, dx, _, _ = aug.draws(np.arange(32))
    assert dy.min() == dx.min() == 0 and dy.max() == dx.max() == 4


@pytest.mark.parametrize("flip", [False, True])
def test_crop_and_flip_equal_the_shifted_arrays_by_hand(flip):
    base, aug = _augmented(seed=2, crop_padding=3, flip=flip)
    positions, ids = np.arange(40, 72), np.arange(32) * 11
    out = aug.batch_at(positions, ids)["images"]
    dy, dx, flipped, weight = aug.draws(positions)
    assert flipped.any() == flip and not flipped.all()  # with flips, about half
    assert np.all(weight == 1)
    for r, i in enumerate(ids):
        padded = np.pad(base[int(i)]["images"], ((3, 3), (3, 3), (0, 0)))
        expected = padded[dy[r]:dy[r] + 8, dx[r]:dx[r] + 8]
        if flipped[r]:
            expected = expected[:, ::-1]
        np.testing.assert_array_equal(out[r], expected)
    # A row drawn at offset (3, 3) is the image itself; one at (0, 0) is shifted down-right.
    centre = np.flatnonzero((dy == 3) & (dx == 3) & ~flipped)
    corner = np.flatnonzero((dy == 0) & (dx == 0) & ~flipped)
    if len(centre):
        np.testing.assert_array_equal(out[centre[0]], base[int(ids[centre[0]])]["images"])
    if len(corner):
        x = base[int(ids[corner[0]])]["images"]
        np.testing.assert_array_equal(out[corner[0]][3:, 3:], x[:5, :5])
        assert np.all(out[corner[0]][:3] == 0) and np.all(out[corner[0]][:, :3] == 0)


def test_mixup_mixes_pairs_of_rows_with_beta_weights():
    base, mixed = _augmented(seed=4, crop_padding=1, flip=True, mixup=0.4)
    _, unmixed = _augmented(seed=4, crop_padding=1, flip=True)
    positions, ids = np.arange(64, 96), np.arange(32) * 3
    out, x = mixed.batch_at(positions, ids), unmixed.batch_at(positions, ids)["images"]
    w = out["mix_weight"]
    assert w.dtype == np.float32 and np.all((w >= 0) & (w <= 1)) and len(set(w)) == 32
    partner = np.arange(32) ^ 1
    np.testing.assert_array_equal(out["labels"], base.labels_N[ids])
    np.testing.assert_array_equal(out["mix_labels"], base.labels_N[ids][partner])
    w_B111 = w[:, None, None, None]
    np.testing.assert_allclose(out["images"], w_B111 * x + (1 - w_B111) * x[partner],
                               rtol=1e-6, atol=1e-6)
    # Unaugmented reads (shapes, fingerprint) carry the record mixed with itself.
    record = mixed[5]
    assert record["mix_labels"] == record["labels"] and record["mix_weight"] == 1.0


def test_held_out_batches_are_unaugmented_and_carry_the_mixup_fields():
    cfg = _cfg(*AUGMENT, "data.val_fraction=0.2", "batch_size=16")
    _, held_out = images.pipelines(cfg, (8, 8, 1), 10, ONE_DEVICE)
    _, plain = images.pipelines(_cfg("data.val_fraction=0.2", "batch_size=16"), (8, 8, 1), 10,
                                ONE_DEVICE)
    a, b = held_out.local_batch(3), plain.local_batch(3)
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["mix_labels"], a["labels"])
    assert np.all(a["mix_weight"] == 1) and set(b) == {"images", "labels"}


# --------------------------------------------------------------------------------------------
# 4. Iterator state and fingerprints.

def test_restored_iterator_continues_with_equal_batches():
    cfg = _cfg(*AUGMENT, "batch_size=16", "seed=1")
    train, _ = images.pipelines(cfg, (8, 8, 1), 10, ONE_DEVICE)
    it = train.iterator()
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(3)]
    it.close()
    again, _ = images.pipelines(cfg, (8, 8, 1), 10, ONE_DEVICE)  # a new process, say
    resumed = again.iterator()
    resumed.set_state(state)
    assert resumed.step == 3
    for batch in expected:
        for key, value in next(resumed).items():
            np.testing.assert_array_equal(np.asarray(value), batch[key])
    resumed.close()
    # Other augmentation settings read another stream: the fingerprint says so.
    for change in ("data.crop_padding=1", "data.flip=false", "data.mixup=0.2"):
        other, _ = images.pipelines(_cfg(*AUGMENT, "batch_size=16", "seed=1", change),
                                    (8, 8, 1), 10, ONE_DEVICE)
        assert other.fingerprint != train.fingerprint, change
        with pytest.raises(ConfigError, match="data.crop_padding, data.flip, data.mixup"):
            other.iterator(state=state)


def test_folder_fingerprint_follows_its_files(tmp_path):
    root = _write_folder(tmp_path / "pngs")
    cfg = _cfg(f"data.path={root}", "data.val_fraction=0.25", classes=3, shape="[8,8,3]",
               source="image_folder")
    before = images.pipelines(cfg, (8, 8, 3), 3, ONE_DEVICE)[0].fingerprint
    assert images.pipelines(cfg, (8, 8, 3), 3, ONE_DEVICE)[0].fingerprint == before
    (root / "bee" / "03.png").rename(root / "bee" / "03b.png")  # same images, one renamed
    assert images.pipelines(cfg, (8, 8, 3), 3, ONE_DEVICE)[0].fingerprint != before


# --------------------------------------------------------------------------------------------
# 5. Digits.

def test_digits_split_is_fixed_and_upsampled():
    raw, labels = images.digits_arrays()
    assert raw.shape == (1797, 8, 8, 1) and raw.max() == 1.0
    train, held_out = images.sources(_cfg("data.val_fraction=0.2", shape="[16,16,1]"),
                                     (16, 16, 1), 10)
    assert (len(train), len(held_out)) == (1437, 360)
    assert train[0]["images"].shape == (16, 16, 1) and train[0]["images"].dtype == np.float32
    assert set(train.labels_N) == set(held_out.labels_N) == set(range(10))
    np.testing.assert_allclose(train.images_NHWC.mean(), 0, atol=1e-5)
    np.testing.assert_allclose(train.images_NHWC.std(), 1, atol=1e-5)
    # The split is independent of the run's seed, and at 8x8 the images are the raw digits
    # standardised by the training split's mean and std.
    small, small_held = images.sources(_cfg("data.val_fraction=0.2", "seed=9"), (8, 8, 1), 10)
    held = images.held_out_rows(1797, 0.2, "digits")
    assert held.sum() == 360
    np.testing.assert_array_equal(small.labels_N, labels[~held])
    np.testing.assert_array_equal(small_held.labels_N, held_out.labels_N)
    mean, std = raw[~held].mean(), raw[~held].std()
    np.testing.assert_allclose(small.images_NHWC, (raw[~held] - mean) / std, rtol=1e-5,
                               atol=1e-5)
    # Upsampling is bilinear with pixel centres at half-integers: a ramp stays a ramp inside.
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32), (1, 8, 8))[..., None]
    up = images.resize(ramp, 16, 16)[0, 5, :, 0]
    np.testing.assert_allclose(up[1:15], (np.arange(1, 15) + 0.5) / 2 - 0.5, atol=1e-5)
    rgb, _ = images.sources(_cfg("data.val_fraction=0.2", shape="[8,8,3]"), (8, 8, 3), 10)
    np.testing.assert_allclose(rgb.images_NHWC[..., 1:], rgb.images_NHWC[..., :1].repeat(2, -1),
                               rtol=1e-6)
    assert [len(images.sources(_cfg(f"data.val_fraction={f}"), (8, 8, 1), 10)[1])
            for f in (0.02, 0.1)] == [36, 180]


def test_npz_reads_given_held_out_arrays_and_converts_channels(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 4, 4, 3)).astype(np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, images=rgb, labels=np.arange(20) % 3, val_images=rgb[:5],
             val_labels=np.zeros(5, np.int64))
    train, held_out = images.sources(_cfg(f"data.path={path}", classes=3, source="npz"),
                                     (4, 4, 1), 3)
    assert (len(train), len(held_out)) == (20, 5)
    luma = rgb.astype(np.float32) @ images.LUMA
    expected = (luma - luma.mean()) / luma.std()
    np.testing.assert_allclose(train.images_NHWC[..., 0], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(held_out.images_NHWC[..., 0], expected[:5], rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_array_equal(train.labels_N, np.arange(20) % 3)


# --------------------------------------------------------------------------------------------
# 6. Bad inputs: one line each.

def _png_folder(root, files):
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".png"):
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / name)
        else:
            (root / name).write_text("x")
    root.mkdir(exist_ok=True)
    return root


def _npz_file(root, **arrays):
    root.mkdir()
    np.savez(root / "d.npz", **arrays)
    return root / "d.npz"


IMGS = np.zeros((6, 4, 4), np.uint8)

def _folder(*files):
    return lambda p: _png_folder(p, files)


def _npz(**arrays):
    return lambda p: _npz_file(p, **arrays)


FOLDER, NPZ = ["data.source=image_folder"], ["data.source=npz"]
LAYOUT = "image_folder reads data.path/<class name>/*.png|*.jpg|*.jpeg"
# case -> (writes the data under p and returns data.path, or None; overrides; num_classes;
#          task.input_shape; the message, with {p} for the data's directory)
BAD = {
    "empty class": (_folder("a/0.png", "b/notes.txt"), FOLDER, 2, "[8,8,3]",
                    "data.path='{p}': class folder 'b' has no images (.png, .jpg, .jpeg)"),
    "no class folders": (_folder("0.png"), FOLDER, 2, "[8,8,3]",
                         "data.path='{p}' has no class folders; " + LAYOUT),
    "class count": (_folder("a/0.png", "b/0.png"), FOLDER, 3, "[8,8,3]",
                    "data.path='{p}' has 2 class folders (a, b) but task.num_classes=3"),
    "not a directory": (lambda p: f"{p}/none", FOLDER, 3, "[8,8,3]",
                        "data.path='{p}/none' is not a directory; " + LAYOUT),
    "one image only": (_folder("a/0.png"), FOLDER, 1, "[8,8,3]",
                       "data.source='image_folder' data.path='{p}' has no held-out images "
                       "(data.val_fraction=0.02)"),
    "npz missing key": (_npz(images=IMGS), NPZ, 3, "[4,4,1]",
                        "data.path='{p}/d.npz' has no 'labels' array (it holds: images); it "
                        "needs images [N, H, W] or [N, H, W, C] and labels [N]"),
    "npz val half": (_npz(images=IMGS, labels=np.zeros(6, int), val_images=IMGS), NPZ, 3,
                     "[4,4,1]",
                     "data.path='{p}/d.npz' has 'val_images' but no 'val_labels': give both, "
                     "or neither to hold out data.val_fraction of the images"),
    "npz label range": (_npz(images=IMGS, labels=np.arange(6)), NPZ, 3, "[4,4,1]",
                        "data.path='{p}/d.npz': labels hold values in [0, 5] but "
                        "task.num_classes=3 needs them in [0, 3)"),
    "npz label count": (_npz(images=IMGS, labels=np.zeros(5, int)), NPZ, 3, "[4,4,1]",
                        "data.path='{p}/d.npz': labels has shape [5] but images holds 6 images"),
    "npz float labels": (_npz(images=IMGS, labels=np.zeros(6)), NPZ, 3, "[4,4,1]",
                         "data.path='{p}/d.npz': labels has dtype float64; class ids must be "
                         "integers"),
    "npz image rank": (_npz(images=np.zeros((6, 16)), labels=np.zeros(6, int)), NPZ, 3,
                       "[4,4,1]",
                       "data.path='{p}/d.npz': images has shape [6, 16]; it must be [N, H, W] "
                       "or [N, H, W, C]"),
    "npz unreadable": (lambda p: f"{_png_folder(p, ['d.npz'])}/d.npz", NPZ, 3, "[4,4,1]",
                       "data.path='{p}/d.npz' cannot be read as a .npz file of arrays "
                       "(numpy.savez)"),
    "npz missing": (lambda p: f"{p}.npz", NPZ, 3, "[4,4,1]",
                    "data.path='{p}.npz' is not a file; npz reads a .npz file of arrays"),
    "digits classes": (None, [], 4, "[8,8,1]",
                       "data.source='digits' holds 10 classes but task.num_classes=4"),
    "channels": (None, [], 10, "[8,8,2]",
                 "task.input_shape=[8, 8, 2] is not [H, W, C] with C = 1 (grayscale) or 3 "
                 "(RGB), which image sources give"),
    "crop of features": (None, ["data.source=synthetic", "data.crop_padding=2"], 10, "[16]",
                         "data.crop_padding=2 and data.flip=False crop and flip images "
                         "[H, W, C], but task.input_shape=[16]"),
    "mixup odd rows": (None, ["data.mixup=0.2", "batch_size=7"], 10, "[8,8,1]",
                       "data.mixup=0.2 mixes rows in pairs (2i, 2i+1), but this process holds "
                       "rows 0..6 of batch_size=7; give each process an even number of rows"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_fail_with_one_line(tmp_path, case):
    write, overrides, classes, shape, message = BAD[case]
    where = tmp_path / "data"
    path = [f"data.path={write(where)}"] if write else []
    cfg = _cfg(*overrides, *path, classes=classes, shape=shape)
    with pytest.raises(ConfigError) as info:
        images.pipelines(cfg, tuple(cfg.task.input_shape), classes, ONE_DEVICE)
    assert str(info.value) == message.format(p=where)


def test_unreadable_image_fails_its_read_naming_the_file(tmp_path):
    root = _png_folder(tmp_path / "data", [f"a/{i}.png" for i in range(4)])
    (root / "a" / "2.png").write_bytes(b"not a png")
    cfg = _cfg(f"data.path={root}", "data.val_fraction=0.3", classes=1, shape="[8,8,3]",
               source="image_folder")
    train, held_out = images.sources(cfg, (8, 8, 3), 1)  # the build opens no file
    assert sorted(train.files + held_out.files) == [f"a/{i}.png" for i in range(4)]
    split = train if "a/2.png" in train.files else held_out
    bad = split.files.index("a/2.png")
    message = (f"data.path='{root}': cannot read image '{root}/a/2.png' (cannot identify image "
               f"file '{root}/a/2.png')")
    with pytest.raises(ConfigError) as info:
        split.batch(np.array([bad]))
    assert str(info.value) == message
    # In the pipeline's reader threads, the step that reads it fails with the same line (the
    # fingerprint reads files 0, 2 and 4 only).
    files = ["a/0.png", "a/1.png", "a/3.png", "a/2.png", "a/0.png"]
    records = images.ImageFiles(str(root), files, np.zeros(5, np.int32), (8, 8, 3))
    it = DataPipeline(records, global_batch=1, sharding=ONE_DEVICE, shuffle=False).iterator()
    for _ in range(3):
        next(it)
    with pytest.raises(ConfigError) as info:
        next(it)
    assert str(info.value) == message
    it.close()


def test_unpaired_mixup_positions_are_refused():
    _, aug = _augmented(mixup=0.4)
    with pytest.raises(ValueError) as info:
        aug.batch_at(np.arange(3, 7), np.arange(4))
    assert str(info.value) == ("mixup mixes rows in pairs (2i, 2i+1) of the stream, but the rows "
                               "read are at positions 3..6")
