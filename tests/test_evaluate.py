"""Tests for minidit/evaluate.py: the cross-entropy and classifier gradients, the matrix square root and the Frechet
distance against closed forms, the scores of real, noisy and mislabelled digits, the cache, and the CLI's errors.

Everything runs on a small classifier trained here (400 steps on 2 000 digits, about 5 s) and on small digit sets
rendered into a temporary folder, so no test depends on (or writes) the repository's cache.
"""
import warnings

import numpy as np
from PIL import Image
import pytest

from minidit.dev import evaluate as E
from minidit.data import load_dataset
from minidit.gradcheck import check_backward, numerical_grad, random_indices, rel_error

TOL = 1e-6  # float64 central differences: ~1e-10 when right, > 1e-2 when wrong


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: tiny data and a tiny classifier
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluate-cache")


@pytest.fixture(scope="module")
def heldout(cache_dir):
    return E.heldout_digits(n_per_class=200, cache_dir=cache_dir)  # 2 000 real digits, seed 1


@pytest.fixture(scope="module")
def classifier(cache_dir, heldout):
    params, info = E.train_classifier(hidden=128, steps=400, batch_size=64, n_per_class=200, cache_dir=cache_dir,
                                      heldout=heldout, progress=False)
    return params, {"heldout_accuracy": info["heldout_accuracy"]}


@pytest.fixture(scope="module")
def real(cache_dir):
    """300 real digits from a third renderer seed: neither trained on nor in the reference set."""
    ds = load_dataset("digits", seed=2, n_per_class=30, cache_dir=cache_dir)  # (300, 3, 32, 32)
    return ds.data.transpose(0, 2, 3, 1), ds.labels                              # (300, 32, 32, 3)


# ----------------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_cross_entropy_gradient(seed):
    rng = np.random.default_rng(seed)
    N, K = rng.integers(1, 6), rng.integers(2, 11)
    inputs = dict(logits=rng.standard_normal((N, K)) * 3, labels=rng.integers(0, K, N))
    errors = check_backward(E.cross_entropy_forward, lambda d, c: {"logits": E.cross_entropy_backward(d, c)},
                            inputs, rng=rng)
    assert errors["logits"] < TOL, errors


def test_cross_entropy_value_and_stability():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    loss, _ = E.cross_entropy_forward(logits, np.array([2, 0]))
    ref = -np.log(np.exp(3) / np.exp([1, 2, 3]).sum()) / 2 + np.log(3) / 2
    assert abs(float(loss) - ref) < 1e-12
    big = np.array([[1000.0, -1000.0], [-1000.0, 1000.0]], dtype=np.float32)  # exp would overflow unshifted
    loss, cache = E.cross_entropy_forward(big, np.array([0, 0]))
    assert np.isfinite(loss) and abs(float(loss) - 1000.0) < 1e-3
    assert np.isfinite(E.cross_entropy_backward(1.0, cache)).all()


def test_classifier_backward():
    """The whole classifier (float64, hidden 6) against central differences on sampled entries of every parameter."""
    rng = np.random.default_rng(0)
    params = E.init_classifier(hidden=6, seed=1, dtype=np.float64)
    for name in params:  # non-zero biases, so their gradients are not tested only at 0
        if name.endswith("bias"):
            params[name] += rng.standard_normal(params[name].shape) * 0.5
    x = rng.uniform(-1, 1, (3, 1024))
    y = np.array([0, 4, 9])

    def loss():
        logits, _ = E.classifier_forward(params, x)
        return E.cross_entropy_forward(logits, y)[0]

    logits, cache = E.classifier_forward(params, x)
    _, ce = E.cross_entropy_forward(logits, y)
    grads = E.classifier_backward(E.cross_entropy_backward(1.0, ce), cache)
    assert set(grads) == set(params)
    for name, p in params.items():
        idx = random_indices(p.shape, 30, rng)
        num = numerical_grad(loss, p, indices=idx)
        sel = tuple(np.array(i) for i in zip(*idx))
        assert rel_error(grads[name][sel], num[sel], floor=1e-3) < TOL, name


# ----------------------------------------------------------------------------------------------------------------
# Matrix square root and Frechet distance
# ----------------------------------------------------------------------------------------------------------------
def test_sqrtm_psd_known_cases():
    # [[2, 1], [1, 2]] has eigenvalues 3 and 1 along (1, 1) and (1, -1)
    s3 = np.sqrt(3.0)
    expected = 0.5 * np.array([[s3 + 1, s3 - 1], [s3 - 1, s3 + 1]])
    np.testing.assert_allclose(E.sqrtm_psd([[2.0, 1.0], [1.0, 2.0]]), expected, atol=1e-12)
    np.testing.assert_allclose(E.sqrtm_psd(np.diag([4.0, 9.0, 0.0])), np.diag([2.0, 3.0, 0.0]), atol=1e-12)
    rng = np.random.default_rng(0)
    b = rng.standard_normal((20, 20))
    s = b @ b.T  # a symmetric PSD square root of s @ s, which is unique
    np.testing.assert_allclose(E.sqrtm_psd(s @ s), s, atol=1e-8 * np.abs(s).max())
    low_rank = b[:, :5] @ b[:, :5].T  # singular: rounding makes some eigenvalues slightly negative
    r = E.sqrtm_psd(low_rank)
    assert np.isfinite(r).all()
    np.testing.assert_allclose(r @ r, low_rank, atol=1e-8 * np.abs(low_rank).max())


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 8
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt v1 - sqrt v2)^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert abs(E.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) - expected) < 1e-10
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, 3))
    s1, s2 = a @ a.T, b @ b.T  # non-commuting, s2 singular
    assert abs(E.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    for x, y in ((s1, s2), (s2, s1)):  # either argument may be the singular one
        tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(x @ y).real, 0, None)).sum()
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(x) + np.trace(y) - 2 * tr_sqrt
        assert abs(E.frechet_distance(mu1, x, mu2, y) - expected) < 1e-8 * expected


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_perturbation(classifier, real):
    params, _ = classifier
    images, _ = real
    _, feats = E.predict(params, E.preprocess(images))
    mu, sigma = E.feature_stats(feats)
    assert abs(E.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)
    rng = np.random.default_rng(0)
    distances = []
    for std in (10, 40, 100):
        noisy = np.clip(images + rng.normal(0, std, images.shape), 0, 255).astype(np.uint8)
        _, f = E.predict(params, E.preprocess(noisy))
        distances.append(E.frechet_distance(mu, sigma, *E.feature_stats(f)))
    assert 0 < distances[0] < distances[1] < distances[2], distances


# ----------------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------------
def test_tiny_classifier_is_accurate(classifier):
    assert classifier[1]["heldout_accuracy"] > 0.95


def test_real_digits_score_high(classifier, heldout, real):
    images, labels = real
    r = E.evaluate(images, labels, classifier=classifier, heldout=heldout)
    assert r["n"] == 300 and r["per_class_n"] == [30] * 10
    assert r["accuracy"] > 0.95 and r["min_class_accuracy"] > 0.8 and r["mean_confidence"] > 0.85
    assert r["num_reference"] == 1000 and r["num_floor"] == 300  # floor: as many real digits per class as samples
    # real digits sit as close to the reference as other real digits do (same N, same labels)
    assert 0 < r["frechet_distance"] < 1.5 * r["reference_frechet_distance"], r
    gray = E.evaluate(images[..., :1], labels, classifier=classifier, heldout=heldout)  # C = 1 reads the same
    assert gray["accuracy"] == r["accuracy"]
    assert abs(gray["frechet_distance"] - r["frechet_distance"]) < 1e-6 * r["frechet_distance"]
    table = E.format_table(r)
    assert "| **all** | **300** |" in table and "Frechet distance" in table and "reference:" in table


def test_smaller_square_images_are_resized_for_the_classifier(classifier, heldout, real):
    """16 x 16 digits (the 32 x 32 ones shrunk) are scaled back up to 32 x 32 and still read as their class."""
    images, labels = real
    small = np.stack([np.asarray(Image.fromarray(im).resize((16, 16), Image.BILINEAR)) for im in images])
    r = E.evaluate(small, labels, classifier=classifier, heldout=heldout)
    assert r["n"] == 300 and r["accuracy"] > 0.9, r["accuracy"]


def test_noise_and_shuffled_labels_score_low(classifier, heldout, real):
    images, labels = real
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, images.shape, dtype=np.uint8)
    r = E.evaluate(noise, labels, classifier=classifier, heldout=heldout)
    assert r["accuracy"] < 0.3
    assert r["frechet_distance"] > 5 * r["reference_frechet_distance"], r
    shuffled = E.evaluate(images, rng.permutation(labels), classifier=classifier, heldout=heldout)
    assert shuffled["accuracy"] < 0.3 and shuffled["mean_confidence"] < 0.3


def test_missing_classes_and_single_image(classifier, heldout, real):
    images, labels = real
    keep = labels < 3
    r = E.evaluate(images[keep], labels[keep], classifier=classifier, heldout=heldout)
    assert r["per_class_accuracy"][3:] == [None] * 7 and r["num_floor"] == keep.sum()
    assert "| 5 | 0 | - |" in E.format_table(r)
    one = E.evaluate(images[:1], labels[:1], classifier=classifier, heldout=heldout)
    assert one["n"] == 1 and one["frechet_distance"] is None and "| - |" in E.format_table(one)


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------
def test_classifier_cache_trains_once_and_rebuilds_a_damaged_file(tmp_path, monkeypatch, classifier):
    calls = []

    def fake_train(**kwargs):  # the recipe's arguments reach the trainer; the training itself is skipped
        calls.append(kwargs)
        return classifier[0], {"heldout_accuracy": 0.5, "recipe": {"hidden": 128}}

    monkeypatch.setattr(E, "train_classifier", fake_train)
    params, meta = E.load_classifier(cache_dir=tmp_path, progress=False)
    path = E.classifier_path(tmp_path)
    assert path.exists() and len(calls) == 1 and calls[0]["steps"] == E.TRAIN_DEFAULTS["steps"]
    params2, meta2 = E.load_classifier(cache_dir=tmp_path)
    assert len(calls) == 1 and meta2["version"] == E.CLASSIFIER_VERSION and meta2["heldout_accuracy"] == 0.5
    for k in params:
        np.testing.assert_array_equal(params[k], params2[k])
    path.write_bytes(b"PK not really a zip")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        E.load_classifier(cache_dir=tmp_path)
    assert len(calls) == 2 and any("retraining" in str(x.message) for x in w)


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------
def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_cli_prints_a_table(tmp_path, monkeypatch, capsys, classifier, heldout, real):
    monkeypatch.setattr(E, "load_classifier", lambda: classifier)
    monkeypatch.setattr(E, "heldout_digits", lambda: heldout)
    images, labels = real
    result = E.main([write_npz(tmp_path / "s.npz", arr_0=images, labels=labels)])
    out = capsys.readouterr().out
    assert "| class | n | accuracy |" in out and "| **all** | **300** |" in out
    assert f"{result['frechet_distance']:.2f}" in out and f"{result['reference_frechet_distance']:.2f}" in out


@pytest.mark.parametrize("arrays, message", [
    (dict(arr_0=np.zeros((2, 32, 32, 3), np.uint8)), "has no 'labels'"),
    (dict(images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(2, int)), "has no 'arr_0'"),
    (dict(arr_0=np.zeros((2, 28, 30, 1), np.uint8), labels=np.zeros(2, int)), "needs square images.*got 28x30"),
    (dict(arr_0=np.zeros((2, 32, 32, 4), np.uint8), labels=np.zeros(2, int)), "C = 1 or 3"),
    (dict(arr_0=np.zeros((2, 32, 32, 3), np.float32), labels=np.zeros(2, int)), "must be uint8"),
    (dict(arr_0=np.zeros((2, 32, 32, 3), np.uint8), labels=np.array([3, 10])), r"lie in \[0, 9\].*\[10\]"),
    (dict(arr_0=np.zeros((2, 32, 32, 3), np.uint8), labels=np.array([-1, 0])), r"lie in \[0, 9\]"),
    (dict(arr_0=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(3, int)), r"shape \(2,\)"),
    (dict(arr_0=np.zeros((0, 32, 32, 3), np.uint8), labels=np.zeros(0, int)), "no images"),
])
def test_cli_errors(tmp_path, monkeypatch, arrays, message):
    def no_classifier():
        raise AssertionError("the classifier must not be loaded for bad input")

    monkeypatch.setattr(E, "load_classifier", no_classifier)
    with pytest.raises(SystemExit, match=message):
        E.main([write_npz(tmp_path / "bad.npz", **arrays)])


def test_cli_missing_or_unreadable_file(tmp_path):
    with pytest.raises(SystemExit, match="no file at .*missing.npz.*arr_0"):
        E.main([str(tmp_path / "missing.npz")])
    (tmp_path / "junk.npz").write_text("not an npz")
    with pytest.raises(SystemExit, match="could not read"):
        E.main([str(tmp_path / "junk.npz")])
