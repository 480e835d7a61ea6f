"""Text prompts on the built-in digits: the renderer's parameters, captions that are true of their images, the
tokenizer, the caption dataset (minidit.text); the text encoder's gradient and the whole CaptionMMDiT's, in float64
against central differences, guidance's null condition, the checkpoint round trip (minidit.captions)."""
import hashlib

import numpy as np
import pytest

from minidit.captions import TOKENS, CaptionMMDiT, CaptionMMDiTSpec, text_encoder_backward, text_encoder_forward
from minidit.data import load_dataset
from minidit.diffusion import cfg_model_fn
from minidit.digits import digit_params, render_digits
from minidit.gradcheck import check_backward, numerical_grad, random_indices, rel_error
from minidit.mmdit import MMDiTSpec
from minidit.text import (MAX_LENGTH, PAD, VOCAB, caption, caption_digits, detokenize, digit_attributes, prompt_digit,
                          tokenize, tokenize_all)

# sha256 of render_digits' images before digit_params was split out of it: the renderer is unchanged
RENDERED = {(3, 16, 0): "89500f4ffdb05b55b89d71795053168c5262adbedb902e1b70ece4c3a693cd54",
            (2, 32, 5): "0f6c73b6863618661504c6086b1ae77fd1cbcd384dc8de02d300f7a8b2b5fab8"}


@pytest.mark.parametrize("args", sorted(RENDERED))
def test_render_digits_draws_the_same_images_as_before(args):
    images, labels = render_digits(*args, progress=False)
    assert hashlib.sha256(images.tobytes()).hexdigest() == RENDERED[args]
    params, labels2 = digit_params(args[0], args[2])
    assert np.array_equal(labels, labels2)
    assert np.all(params["rotation"][labels == 7] <= 0) and np.all(params["shear"][labels == 7] >= 0)


def ink_stats(images):
    """Per image: ink height in rows (rows with a pixel > 64), ink mass, centre of mass (x, y)."""
    im = images.astype(np.float64)
    rows = (im > 64).any(axis=2)
    height = np.array([np.ptp(np.flatnonzero(r)) + 1 for r in rows])
    ys, xs = np.mgrid[:im.shape[1], :im.shape[2]]
    w = im / im.sum(axis=(1, 2), keepdims=True)
    return height, im.sum(axis=(1, 2)), (w * xs).sum(axis=(1, 2)), (w * ys).sum(axis=(1, 2))


def test_the_words_are_true_of_the_rendered_digits():
    """Large digits are taller than small ones, bold ones carry more ink than thin ones, left ones sit left of right
    ones, top ones above bottom ones: means over 300 digits of 16 px."""
    images, labels = render_digits(30, 16, seed=3, progress=False)
    a = digit_attributes(digit_params(30, 3)[0], 16)
    height, ink, cx, cy = ink_stats(images)
    assert height[a["size"] == "large"].mean() > height[a["size"] == "small"].mean() + 1.5
    for d in range(10):  # ink depends on the digit: compare within each
        m = labels == d
        if (m & (a["weight"] == "bold")).any() and (m & (a["weight"] == "thin")).any():
            assert ink[m & (a["weight"] == "bold")].mean() > ink[m & (a["weight"] == "thin")].mean()
    assert cx[a["x"] == "right"].mean() > cx[a["x"] == "left"].mean() + 1
    assert cy[a["y"] == "bottom"].mean() > cy[a["y"] == "top"].mean() + 1


def test_captions_vary_in_phrasing_and_order_and_state_only_true_attributes():
    params, labels = digit_params(20, 0)
    rng = np.random.default_rng(0)
    caps = caption_digits(params, labels, 16, rng, variants=6)
    attrs = digit_attributes(params, 16)
    flat = [c for cs in caps for c in cs]
    assert len(set(flat)) > 0.8 * len(flat)
    ids = tokenize_all(flat)
    assert ids.shape == (len(flat), MAX_LENGTH) and (ids != PAD).sum(axis=1).max() <= MAX_LENGTH
    for i, cs in enumerate(caps):
        for c in cs:
            assert prompt_digit(c) == labels[i]
            words = set(c.replace(",", " ").split())
            if words & {"small", "tiny"}:
                assert attrs["size"][i] == "small"
            if words & {"large", "big"}:
                assert attrs["size"][i] == "large"
            if words & {"bold", "thick"}:
                assert attrs["weight"][i] == "bold"
            if "tilted" in words or "leaning" in words:
                assert attrs["tilt"][i] in words
            for where in ("top", "bottom"):
                if where in words:
                    assert attrs["y"][i] == where
    # the same attributes come in more than one order: "small" before and after "bold"
    both = [c for c in flat if "small" in c.split() and "bold" in c.split()]
    assert any(c.index("small") < c.index("bold") for c in both) and any(c.index("small") > c.index("bold")
                                                                        for c in both)
    one = caption(3, dict(size="large", weight="", tilt="", x="left", y=""), np.random.default_rng(1))
    assert prompt_digit(one) == 3


def test_tokenizer():
    ids = tokenize("A large, BOLD 3 on the left")
    assert ids.dtype == np.int64 and ids.shape == (MAX_LENGTH,)
    assert detokenize(ids) == "a large bold 3 on the left" and np.all(ids[7:] == PAD)
    assert VOCAB[PAD] == "<pad>" and len(set(VOCAB)) == len(VOCAB)
    with pytest.raises(ValueError, match="unknown word 'purple'.*vocabulary is: a an the"):
        tokenize("a purple 3")
    with pytest.raises(ValueError, match="unknown word"):
        tokenize("<pad> 3")
    with pytest.raises(ValueError, match=f"17 words; at most {MAX_LENGTH}"):
        tokenize(" ".join(["3"] * 17))
    assert not tokenize("").any()  # the empty prompt is the null condition
    assert prompt_digit("the digit seven, tilted right") == 7
    for bad in ("a large digit", "a 3 and a 4"):
        with pytest.raises(ValueError, match="name exactly one"):
            prompt_digit(bad)


def test_the_caption_dataset(tmp_path):
    ds = load_dataset("digits-captions", image_size=16, channels=1, n_per_class=5, cache_dir=tmp_path)
    plain = load_dataset("digits", image_size=16, channels=1, n_per_class=5, cache_dir=tmp_path)
    assert ds.kind == "digits-captions" and np.array_equal(ds.data, plain.data)
    assert ds.tokens.shape == (50, 4, MAX_LENGTH) and ds.texts.shape == (50, 4)
    x, y = ds.batch(3, 8, seed=1)
    x2, _ = plain.batch(3, 8, seed=1)
    assert np.array_equal(x, x2) and y.dtype == np.int64 and y.shape == (8, MAX_LENGTH)
    x3, y3 = ds.batch(3, 8, seed=1)
    assert np.array_equal(x, x3) and np.array_equal(y, y3)  # a pure function of (step, B, seed)
    labels = ds.batch_labels(3, 8, seed=1)
    assert [prompt_digit(detokenize(t)) for t in y] == labels.tolist()
    # the variant is drawn per sample: over many batches every variant of some image is used
    picks = {tuple(t) for s in range(40) for t in ds.batch(s, 25, 0)[1]}
    assert len(picks) > 60


def test_the_text_encoders_gradient_sums_repeated_tokens():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((7, 5))
    ids = np.array([[3, 3, 1, 0, 0], [0, 0, 0, 0, 0], [6, 2, 3, 2, 0]])  # repeats, an all-padding caption

    def forward(table):
        context, pooled, cache = text_encoder_forward(ids, table)
        return np.concatenate([context.reshape(3, -1), 2 * pooled], axis=1), cache

    def backward(dout, cache):
        return text_encoder_backward(dout[:, :25].reshape(3, 5, 5), 2 * dout[:, 25:], cache)

    err = check_backward(forward, backward, dict(table=table), "table")
    assert err["table"] < 1e-8
    _, pooled, _ = text_encoder_forward(ids, table)
    assert not pooled[1].any() and np.allclose(pooled[0], (2 * table[3] + table[1]) / 3)


TINY = dict(sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=2, attention_head_dim=4,
            num_attention_heads=2, caption_projection_dim=8, joint_attention_dim=6, pooled_projection_dim=6,
            pos_embed_max_size=4)


def tiny_model(seed=0, **overrides):
    """float64, every trainable parameter drawn N(0, 0.3^2) (not the init)."""
    spec = CaptionMMDiTSpec(MMDiTSpec(**{**TINY, **overrides}), max_length=5, caption_dropout_prob=0.1)
    model = CaptionMMDiT(spec, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 100)
    for name in model.trainable():
        model.params[name][...] = rng.standard_normal(model.params[name].shape) * 0.3
    return model


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_every_gradient_of_the_caption_model_matches_finite_differences(qk_norm):
    model = tiny_model(qk_norm=qk_norm)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 1, 8, 8))
    t = np.array([10.0, 500.0, 990.0])
    y = np.array([[4, 4, 9, 0, 0], [1, 2, 3, 4, 5], [0, 0, 0, 0, 0]])
    out, cache = model.forward(x, t, y)
    dout = rng.standard_normal(out.shape)
    grads, dx = model.backward(dout, cache, return_dx=True)
    assert list(grads) == model.trainable() and grads[TOKENS].shape == (len(VOCAB), 6)
    zero = "transformer_blocks.1.attn.norm_added_q.weight"  # the last block's text queries are never used

    def loss():
        return np.sum(model.forward(x, t, y, cache=False)[0] * dout)

    for name in model.trainable() + ["x"]:
        g, arr = (dx, x) if name == "x" else (grads[name], model.params[name])
        idx = random_indices(arr.shape, 12, rng)
        if name == TOKENS:  # the rows the captions use, padding row 0 included
            idx = [(r, c) for r in (0, 1, 4, 9) for c in range(6)]
        num = numerical_grad(loss, arr, h=1e-5, indices=idx)
        sel = tuple(np.array(i) for i in zip(*idx))
        if name == zero:
            assert not np.any(g)
            continue
        assert np.linalg.norm(g[sel]) > 0, f"{name}: vacuous check"
        assert rel_error(g[sel], num[sel], floor=1e-3) < 1e-6, name
    unused = [r for r in range(len(VOCAB)) if r not in (0, 1, 2, 3, 4, 5, 9)]
    assert not grads[TOKENS][unused].any()


def test_caption_dropout_is_the_all_padding_caption():
    model = tiny_model()
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((2, 1, 8, 8)), np.array([3.0, 400.0])
    y = np.array([[4, 9, 0, 0, 0], [7, 8, 0, 0, 0]])
    dropped = model.forward(x, t, y, force_drop_ids=np.array([1, 0]), cache=False)[0]
    null = model.forward(x, t, np.stack([model.null_condition, y[1]]), cache=False)[0]
    assert np.array_equal(dropped, null)
    assert model.condition_dropout(1000, np.random.default_rng(0)).mean() == pytest.approx(0.1, abs=0.03)
    with pytest.raises(ValueError, match=r"y must have shape \(2, 5\) \(token ids"):
        model.forward(x, t, y[:, :3])
    with pytest.raises(ValueError, match="must lie in"):
        model.forward(x, t, y + 100)


def test_guidance_with_an_array_null_condition():
    seen = []

    def forward(x, t, y):
        seen.append(y)
        return x * (1 + y.sum(axis=1))[:, None, None, None]

    y = np.array([[3, 1], [2, 2]])
    fn = cfg_model_fn(forward, y, np.zeros(2, dtype=np.int64), 2.0)
    x = np.ones((2, 1, 2, 2))
    out = fn(x, np.zeros(2))
    assert np.array_equal(seen[0], [[3, 1], [2, 2], [0, 0], [0, 0]])
    assert np.allclose(out[:, 0, 0, 0], 1 + 2 * (5 - 1))


def test_the_caption_model_round_trips_through_a_checkpoint(tmp_path):
    from minidit.checkpoint import build_model

    model = tiny_model()
    spec = model.spec.to_dict()
    assert spec["kind"] == "mmdit-captions"
    again = build_model(spec, dtype=np.float64)
    again.load_state_dict(model.state_dict())
    x, t, y = np.ones((1, 1, 8, 8)), np.array([5.0]), np.array([[4, 0, 0, 0, 0]])
    assert np.array_equal(model.forward(x, t, y, cache=False)[0], again.forward(x, t, y, cache=False)[0])
    view = model.using({k: v * 0 for k, v in model.params.items()})  # an EMA-like view reads its own dict
    assert not np.array_equal(view.forward(x, t, y, cache=False)[0], model.forward(x, t, y, cache=False)[0])


def test_train_sample_evaluate_with_prompts(tmp_path, capsys):
    """Two training steps of the MM-DiT on the captioned digits, prompts -> a grid and an .npz, then evaluate."""
    from minidit import train as train_mod
    from minidit.checkpoint import load_model
    from minidit.dev.evaluate import main as evaluate_main
    from minidit.sample import main as sample_main

    run = str(tmp_path / "r")
    train_mod.main(["--model", "mmdit", "--objective", "flow", "--data", "digits-captions", "--variant", "mini/8",
                    "--batch-size", "4", "--steps", "2", "--sample-steps", "2", "--text-dim", "8", "--out", run])
    model = load_model(run)
    assert isinstance(model, CaptionMMDiT) and model.spec.embed_dim == 8 and model.spec.transformer.num_layers == 6
    assert (tmp_path / "r" / "samples.png").exists()
    grid, npz = str(tmp_path / "g.png"), str(tmp_path / "s.npz")
    sample_main(["--ckpt", run, "--prompt", "a large 3 on the left", "--prompt", "the digit seven, tilted right",
                 "--num-sampling-steps", "2", "--out", grid, "--npz", npz])
    with np.load(npz) as f:
        assert f["labels"].tolist() == [3, 7] and f["arr_0"].shape == (2, 16, 16, 1)
    result = evaluate_main([npz])
    assert result["n"] == 2 and 0 <= result["accuracy"] <= 1
    with pytest.raises(SystemExit, match="names 0 digits"):
        sample_main(["--ckpt", run, "--prompt", "a large digit", "--out", grid, "--npz", npz])
    with pytest.raises(SystemExit, match="unknown word 'purple'"):
        sample_main(["--ckpt", run, "--prompt", "a purple 3", "--out", grid])
    with pytest.raises(SystemExit, match="not --class-labels"):
        sample_main(["--ckpt", run, "--class-labels", "3", "--out", grid])
    with pytest.raises(SystemExit, match="train it with --model mmdit"):
        train_mod.main(["--data", "digits-captions", "--steps", "1", "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="--data digits-captions"):
        train_mod.main(["--model", "mmdit", "--objective", "flow", "--steps", "1", "--out", str(tmp_path / "e")])


def test_a_caption_run_resumes_exactly(tmp_path):
    import json

    from minidit import train as train_mod

    fast = ["--model", "mmdit", "--objective", "flow", "--data", "digits-captions", "--variant", "mini/8",
            "--batch-size", "4", "--text-dim", "8", "--log-every", "1", "--no-final-samples"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_mod.main(fast + ["--steps", "3", "--out", a])
    train_mod.main(fast + ["--steps", "2", "--out", b])
    train_mod.main(["--resume", b, "--steps", "3"])

    def losses(run):
        with open(f"{run}/metrics.jsonl") as f:
            return [x for line in f for x in json.loads(line)["losses"]]

    assert len(losses(a)) == 3 and losses(a) == losses(b)
