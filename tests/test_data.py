"""Tests for minidit/data.py: the three dataset kinds, deterministic batching, and image output."""
import warnings

import numpy as np
import pytest
from PIL import Image

from minidit import data as D
from minidit.data import ImageFolder, center_crop_arr, load_dataset, render_digits, save_grid, to_uint8_nhwc

N_PER_CLASS, SIZE = 50, 16  # small digits: 500 images of 16 x 16


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return load_dataset("digits", image_size=SIZE, n_per_class=N_PER_CLASS,
                        cache_dir=tmp_path_factory.mktemp("digits"))


def write_png(path, w, h, rng, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


@pytest.fixture
def folder(tmp_path):
    """root/{cat,dog,emu}/ with images of odd sizes and modes, plus files that must be ignored."""
    rng = np.random.default_rng(0)
    root = tmp_path / "pets"
    write_png(root / "dog" / "a.png", 37, 23, rng)
    write_png(root / "dog" / "b.png", 50, 81, rng, mode="L")
    write_png(root / "dog" / "nested" / "c.png", 16, 16, rng, mode="RGBA")
    write_png(root / "cat" / "a.png", 9, 13, rng, mode="P")  # smaller than the output: upscaled
    write_png(root / "cat" / "b.jpg", 64, 40, rng)
    write_png(root / "emu" / "a.bmp", 100, 33, rng)
    (root / "cat" / "notes.txt").write_text("not an image")
    write_png(root / "cat" / ".hidden.png", 20, 20, rng)
    return root


# ------------------------------------------------------------------------------------------------------------------
# Rendered digits
# ------------------------------------------------------------------------------------------------------------------

def test_render_digits_is_deterministic():
    a, la = render_digits(3, SIZE, seed=0, progress=False)
    b, lb = render_digits(3, SIZE, seed=0, progress=False)
    c, _ = render_digits(3, SIZE, seed=1, progress=False)
    assert a.shape == (30, SIZE, SIZE) and a.dtype == np.uint8
    assert la.dtype == np.int64 and la.tolist() == list(range(10)) * 3
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert len({im.tobytes() for im in a}) == len(a)  # no two samples alike


def test_digits_dataset_properties(digits):
    assert digits.kind == "digits" and len(digits) == 10 * N_PER_CLASS
    assert digits.num_classes == 10 and digits.class_names == [str(d) for d in range(10)]
    assert digits.channels == 3 and digits.image_size == SIZE and digits.flip is False
    assert digits.data.dtype == np.uint8 and digits.data.shape == (500, 3, SIZE, SIZE)
    np.testing.assert_array_equal(digits.data[:, 0], digits.data[:, 2])  # grayscale repeated
    assert np.bincount(digits.labels).tolist() == [N_PER_CLASS] * 10
    # white digit on black: dark border, bright ink somewhere in every image
    assert digits.data[:, 0, 0, :].mean() < 5 and (digits.data.max(axis=(1, 2, 3)) > 120).all()


def test_digits_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    ds = load_dataset("digits", image_size=SIZE, n_per_class=5, seed=3, cache_dir=tmp_path, channels=1)
    assert ds.channels == 1 and ds.data.shape == (50, 1, SIZE, SIZE)
    assert [p.name for p in tmp_path.iterdir()] == [f"digits-v{D.DIGITS_VERSION}-{SIZE}px-5-seed3.npz"]  # no temp file
    with np.load(ds.cache_path, allow_pickle=False) as f:
        assert f["images"].shape == (50, SIZE, SIZE, 1) and f["images"].dtype == np.uint8
        assert f["labels"].dtype == np.int64

    def fail(*args, **kwargs):
        raise AssertionError("should have used the cache")
    monkeypatch.setattr(D, "render_digits", fail)
    again = load_dataset("digits", image_size=SIZE, n_per_class=5, seed=3, cache_dir=tmp_path, channels=3)
    np.testing.assert_array_equal(again.data[:, 1], ds.data[:, 0])


def test_damaged_digits_cache_is_rebuilt(tmp_path):
    ds = load_dataset("digits", image_size=SIZE, n_per_class=2, cache_dir=tmp_path)
    ds.cache_path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="rebuilding the digits cache"):
        again = load_dataset("digits", image_size=SIZE, n_per_class=2, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.data, ds.data)


def test_digit_labels_match_the_images(digits):
    """Each class has its own look: a nearest-class-mean classifier, fit on half the data, beats chance by far."""
    x = digits.data[:, 0].reshape(len(digits), -1).astype(np.float64)  # (N, H*W)
    y = digits.labels
    train = np.arange(len(digits)) < len(digits) // 2
    means = np.stack([x[train & (y == k)].mean(axis=0) for k in range(10)])  # (10, H*W)
    dist = ((x[~train, None, :] - means[None]) ** 2).sum(-1)                # (N/2, 10)
    accuracy = (dist.argmin(axis=1) == y[~train]).mean()
    assert accuracy > 0.35, accuracy  # chance is 0.1
    # and the class means are far apart compared with pixel noise
    gaps = np.sqrt(((means[:, None] - means[None]) ** 2).mean(-1))[np.triu_indices(10, 1)]
    assert gaps.min() > 5.0, gaps.min()


# ------------------------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------------------------

def test_batch_dtypes_and_range(digits):
    x, y = digits.batch(0, 32, seed=0)
    assert x.shape == (32, 3, SIZE, SIZE) and x.dtype == np.float32
    assert y.shape == (32,) and y.dtype == np.int64
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() == -1.0
    # exactly p / 127.5 - 1 of the stored pixels (no flips for digits)
    perm = np.random.default_rng([0, 0]).permutation(len(digits))
    np.testing.assert_array_equal(x, digits.data[perm[:32]].astype(np.float32) / 127.5 - 1)
    np.testing.assert_array_equal(y, digits.labels[perm[:32]])


def test_batch_is_a_pure_function_of_its_arguments(digits):
    x1, y1 = digits.batch(7, 32, seed=0)
    digits.batch(123, 32, seed=5)  # anything in between must not matter
    x2, y2 = digits.batch(7, 32, seed=0)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(digits.batch(8, 32, seed=0)[0], x1)
    assert not np.array_equal(digits.batch(7, 32, seed=1)[0], x1)


def test_epochs_drop_last_and_reshuffle(digits):
    bs = 64
    steps = digits.steps_per_epoch(bs)
    assert steps == len(digits) // bs == 7

    def ids(step):  # identify samples by their bytes (all distinct)
        x, _ = digits.batch(step, bs, seed=0)
        return [im.tobytes() for im in x]
    epoch0 = [i for s in range(steps) for i in ids(s)]
    epoch1 = [i for s in range(steps, 2 * steps) for i in ids(s)]
    assert len(set(epoch0)) == steps * bs  # no repeats within an epoch
    assert epoch0 != epoch1  # a new permutation each epoch
    assert len(set(epoch0) & set(epoch1)) > 0.7 * steps * bs


def test_resumed_run_sees_the_same_batches(digits, tmp_path):
    """Batches 0..9 of one run equal batches 0..4 of a run that stopped plus 5..9 of a fresh process."""
    bs = 48  # 10 steps per epoch: crosses an epoch boundary at step 10
    straight = [digits.batch(s, bs, seed=4) for s in range(15)]
    fresh = load_dataset("digits", image_size=SIZE, n_per_class=N_PER_CLASS, cache_dir=tmp_path)  # new object
    resumed = [digits.batch(s, bs, seed=4) for s in range(5)] + [fresh.batch(s, bs, seed=4) for s in range(5, 15)]
    for (xa, ya), (xb, yb) in zip(straight, resumed):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_batch_errors(digits):
    with pytest.raises(ValueError, match="larger than the dataset"):
        digits.batch(0, len(digits) + 1, seed=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        digits.batch(0, 0, seed=0)
    with pytest.raises(ValueError, match="step and seed must be >= 0"):
        digits.batch(-1, 8, seed=0)
    x, _ = digits.batch(0, len(digits), seed=0)  # one batch of everything is fine
    assert len(x) == len(digits)


def test_flips_mirror_about_half_of_a_batch(tmp_path):
    plain = load_dataset("digits", image_size=SIZE, n_per_class=N_PER_CLASS, cache_dir=tmp_path)
    flipping = load_dataset("digits", image_size=SIZE, n_per_class=N_PER_CLASS, cache_dir=tmp_path, flip=True)
    x0, y0 = plain.batch(3, 200, seed=0)
    x1, y1 = flipping.batch(3, 200, seed=0)
    np.testing.assert_array_equal(y0, y1)  # same samples, same order
    same = (x1 == x0).all(axis=(1, 2, 3))
    mirrored = (x1 == x0[..., ::-1]).all(axis=(1, 2, 3))
    assert (same | mirrored).all()
    assert 60 < mirrored.sum() < 140
    np.testing.assert_array_equal(flipping.batch(3, 200, seed=0)[0], x1)  # flips are deterministic too


# ------------------------------------------------------------------------------------------------------------------
# Image folder
# ------------------------------------------------------------------------------------------------------------------

def test_image_folder_loads_and_crops(folder):
    ds = load_dataset(folder, image_size=SIZE)
    assert isinstance(ds, ImageFolder) and ds.kind == "folder" and ds.flip is True
    assert ds.class_names == ["cat", "dog", "emu"] and ds.num_classes == 3
    assert len(ds) == 6 and ds.labels.tolist() == [0, 0, 1, 1, 1, 2]  # sorted classes, sorted files
    assert ds.data.shape == (6, 3, SIZE, SIZE) and ds.data.dtype == np.uint8
    x, y = ds.batch(0, 4, seed=0)
    assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == np.float32 and -1 <= x.min() <= x.max() <= 1


def test_center_crop_arr_on_known_images():
    # 40 x 20 of constant 2x2 blocks: short side 20 >= 2*10, so one exact BOX halving to 20 x 10,
    # then a no-op resize and a center crop of columns 5..14.
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(10, 20, 3), dtype=np.uint8)        # (h, w, 3)
    img = Image.fromarray(blocks.repeat(2, axis=0).repeat(2, axis=1))      # 40 wide, 20 tall
    np.testing.assert_array_equal(center_crop_arr(img, 10), blocks[:, 5:15])
    # odd sizes: the short side becomes the output size, the crop is centered
    for w, h in [(37, 23), (23, 37), (9, 13), (100, 33), (16, 16)]:
        out = center_crop_arr(Image.new("RGB", (w, h), (10, 200, 30)), 16)
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
        assert (out == (10, 200, 30)).all()  # a flat image stays flat through BOX and BICUBIC
    # which columns survive: a 24 x 16 image with a bright column at x=4 (outside the 16-wide center) and x=12
    arr = np.zeros((16, 24, 3), dtype=np.uint8)
    arr[:, 4] = 255
    arr[:, 12] = 255
    out = center_crop_arr(Image.fromarray(arr), 16)  # no resize (16 == size), crop x offset (24 - 16) // 2 = 4
    np.testing.assert_array_equal(out, arr[:, 4:20])


def test_corrupt_files_are_skipped_with_one_warning(folder):
    (folder / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    good = folder / "cat" / "a.png"
    (folder / "cat" / "truncated.png").write_bytes(good.read_bytes()[:60])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolder(folder, SIZE)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "skipped 2 unreadable image file(s)" in messages[0], messages
    assert "broken.png" in messages[0] or "truncated.png" in messages[0]
    assert len(ds) == 6


def test_image_folder_errors(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(FileNotFoundError, match="does not exist.*own sub-folder"):
        ImageFolder(tmp_path / "nope", SIZE)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is empty.*own sub-folder"):
        ImageFolder(empty, SIZE)
    flat = tmp_path / "flat"
    write_png(flat / "a.png", 20, 20, rng)
    write_png(flat / "b.png", 20, 20, rng)
    with pytest.raises(ValueError, match="2 images but no class sub-folders; put each class's images in its own"):
        ImageFolder(flat, SIZE)
    no_images = tmp_path / "no_images"
    (no_images / "a").mkdir(parents=True)
    (no_images / "a" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="found no images"):
        ImageFolder(no_images, SIZE)
    one_empty = tmp_path / "one_empty"
    write_png(one_empty / "a" / "x.png", 20, 20, rng)
    (one_empty / "b").mkdir()
    with pytest.raises(ValueError, match="without images in .*: b"):
        ImageFolder(one_empty, SIZE)
    all_bad = tmp_path / "all_bad"
    (all_bad / "a").mkdir(parents=True)
    (all_bad / "a" / "x.png").write_bytes(b"nope")
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(ValueError, match="none of the 1 image files"):
        ImageFolder(all_bad, SIZE)


def test_loose_images_next_to_class_folders_warn(folder):
    write_png(folder / "stray.png", 20, 20, np.random.default_rng(1))
    with pytest.warns(UserWarning, match="ignoring 1 images directly in"):
        ds = ImageFolder(folder, SIZE)
    assert len(ds) == 6


def test_load_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dataset at .*pass 'digits'"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="don't know how to read"):
        load_dataset(tmp_path / "weights.pt")


# ------------------------------------------------------------------------------------------------------------------
# Latents
# ------------------------------------------------------------------------------------------------------------------

def test_latents_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((20, 4, 8, 8))  # float64 on disk
    y = rng.integers(0, 5, size=20)
    path = tmp_path / "z.npz"
    np.savez(path, latents=z, labels=y)
    ds = load_dataset(path, image_size=256)  # image_size does not apply to latents
    assert ds.kind == "latents" and ds.flip is False and len(ds) == 20
    assert ds.channels == 4 and ds.image_size == 8 and ds.num_classes == int(y.max()) + 1
    x, yb = ds.batch(2, 6, seed=1)
    idx = np.random.default_rng([1, 0]).permutation(20)[12:18]
    assert x.dtype == np.float32 and yb.dtype == np.int64
    np.testing.assert_array_equal(x, z[idx].astype(np.float32))  # as stored: no scaling, no flips
    np.testing.assert_array_equal(yb, y[idx])
    np.savez(path, latents=z, labels=y, num_classes=1000)
    assert load_dataset(path).num_classes == 1000


@pytest.mark.parametrize("arrays, match", [
    (dict(latents=np.zeros((4, 4, 8, 8))), "has no 'labels'"),
    (dict(x=np.zeros((4, 4, 8, 8)), labels=np.zeros(4, int)), "has no 'latents'"),
    (dict(latents=np.zeros((4, 8, 8)), labels=np.zeros(4, int)), r"must be float \(N, C, h, w\)"),
    (dict(latents=np.zeros((4, 4, 8, 8), np.int32), labels=np.zeros(4, int)), r"must be float \(N, C, h, w\)"),
    (dict(latents=np.zeros((4, 4, 8, 6)), labels=np.zeros(4, int)), "must be square"),
    (dict(latents=np.zeros((4, 4, 8, 8)), labels=np.zeros(3, int)), r"must be int \(N,\) with N = 4"),
    (dict(latents=np.zeros((4, 4, 8, 8)), labels=np.zeros(4)), r"must be int \(N,\)"),
    (dict(latents=np.zeros((4, 4, 8, 8)), labels=-np.ones(4, int)), "must be >= 0"),
    (dict(latents=np.zeros((4, 4, 8, 8)), labels=np.full(4, 7), num_classes=5), "out of range for num_classes=5"),
    # one huge label and no num_classes: refused before it sizes a label table (it once allocated 24 GB)
    (dict(latents=np.zeros((4, 4, 8, 8)), labels=np.array([0, 1, 2, 10**9])), "largest label is 1000000000"),
    (dict(latents=np.zeros((4, 4, 8, 8)), labels=np.zeros(4, int), num_classes=10**9), r"num_classes.*\[1, 100000\]"),
    (dict(latents=np.zeros((4, 4, 8, 8)), labels=np.zeros(4, int), num_classes=np.array([3, 4])), "one integer"),
    (dict(latents=np.full((4, 4, 8, 8), np.nan), labels=np.zeros(4, int)), "NaN or Inf"),
    (dict(latents=np.array([object()] * 4), labels=np.zeros(4, int)), "pickled"),
])
def test_latents_errors(tmp_path, arrays, match):
    path = tmp_path / "z.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
        load_dataset(path)


def test_latents_file_that_is_not_npz(tmp_path):
    path = tmp_path / "z.npz"
    path.write_text("hello")
    with pytest.raises(ValueError, match="could not read .* as .npz"):
        load_dataset(path)


# ------------------------------------------------------------------------------------------------------------------
# Image output
# ------------------------------------------------------------------------------------------------------------------

def test_to_uint8_nhwc_matches_sample_ddp():
    x = np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], dtype=np.float32).reshape(1, 1, 1, 7)
    out = to_uint8_nhwc(np.repeat(x, 3, axis=1))  # (1, 3, 1, 7) -> (1, 1, 7, 3)
    assert out.shape == (1, 1, 7, 3) and out.dtype == np.uint8
    # clamp(127.5 x + 128, 0, 255) then truncate
    assert out[0, 0, :, 0].tolist() == [0, 0, 64, 128, 191, 255, 255]


@pytest.mark.parametrize("channels, mode", [(3, "RGB"), (1, "L")])
def test_save_grid(tmp_path, channels, mode):
    x = np.ones((5, channels, 8, 6), dtype=np.float32)  # white tiles
    path = tmp_path / "sub" / "grid.png"
    save_grid(x, path, nrow=3, scale=1)
    img = Image.open(path)
    assert img.mode == mode
    assert img.size == (3 * (6 + 2) + 2, 2 * (8 + 2) + 2)  # (W, H): 3 columns, 2 rows, 2 px padding
    arr = np.asarray(img)
    assert arr[0].max() == 0 and arr[2:10, 2:8].min() == 255  # black padding, white first tile
    assert arr[12:20, 2 + 2 * 8:8 + 2 * 8].max() == 0  # the 6th slot (row 2, column 3) is empty
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # written atomically, no temp left behind
    save_grid(x, path, nrow=3)  # default scale: small images are enlarged to at least 32 px (8 px -> 4 x 4 blocks)
    big = np.asarray(Image.open(path))
    assert big.shape[:2] == (2 * (32 + 2) + 2, 3 * (24 + 2) + 2) and big[2:34, 2:26].min() == 255
