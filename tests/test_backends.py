"""One code path on every backend: the training step, the loss, sampling, checkpoints and dtypes run through the
strict backend (minidit.dev.strict: a CPU emulation of a device that refuses host arrays and counts host syncs, as CuPy
would) and through CuPy where a GPU is present, and are compared with the numpy backend on the same inputs and
parameters. The last part tests the strict backend itself, so that its refusals are known to work.
"""
import numpy as np
import pytest

from minidit.dev import strict
from minidit import train as train_mod
from minidit.backend import BACKENDS, get_backend
from minidit.xp import get_xp, to_device, to_numpy
from minidit.checkpoint import load_checkpoint, load_model
from minidit.diffusion import Diffusion
from minidit.layers import embedding_backward, embedding_forward
from minidit.model import VARIANTS, DiT, DiTConfig
from minidit.sample import generate
from minidit.sample import main as sample_main

TINY = "tiny/2"  # registered in VARIANTS by the `tiny` fixture, so that runs and checkpoints can name it
CFG = DiTConfig(depth=2, hidden_size=16, num_heads=2, patch_size=2)
N, C, S, K = 4, 3, 8, 10  # batch, channels, input size, classes
RTOL, ATOL = 1e-4, 1e-5  # float32: a device may sum in another order
LR = 1e-3
# Model comparisons run in float32 on strict (which computes exactly as numpy, so the float32 path itself is
# compared) and in float64 on CuPy: a GPU's float32 rounding differs from the CPU's, and at random parameters a
# deep stack amplifies it past any tolerance that would still catch a bug. CuPy's float32 path is covered by
# test_float32_everywhere and by the training step below, which is float32 on every backend.
COMPARE_DTYPE = {"strict": np.float32, "cupy": np.float64}
GPU_RTOL = 1e-3  # the float32 training step on CuPy: error relative to the largest |value| of each array


# ---------------------------------------------------------------- helpers
@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(VARIANTS, TINY, CFG)


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """A 16-example latents file (3 x 8 x 8, 10 classes): the cheapest real dataset for minidit.train."""
    path = tmp_path_factory.mktemp("data") / "latents.npz"
    rng = np.random.default_rng(0)
    np.savez(path, latents=rng.standard_normal((16, C, S, S)).astype(np.float32), labels=np.arange(16) % K)
    return str(path)


def random_state(model, seed):
    """Random parameters for every name: at DiT's init (adaLN-Zero) almost every gradient is exactly zero."""
    rng = np.random.default_rng(seed)
    return {k: (0.3 * rng.standard_normal(shape)).astype(model.dtype) for k, shape in model.param_shapes().items()}


def make_model(backend, seed=0, dtype=np.float32, **kw):
    model = DiT(CFG, input_size=S, in_channels=C, num_classes=K, backend=backend, dtype=dtype, **kw)
    model.load_state_dict(random_state(model, seed))
    return model


def make_run(backend, latents, out, seed=0, objective="ddpm"):
    args, _ = train_mod.parse_args(["--backend", backend, "--variant", TINY, "--data", latents, "--batch-size", str(N),
                                    "--lr", str(LR), "--weight-decay", "0.01", "--out", str(out), "--objective",
                                    objective, "--threads", "1"])  # numpy unsharded: strict then matches it exactly
    run = train_mod.Run(args)
    run.model.load_state_dict(random_state(run.model, seed))  # in place: AdamW keeps tracking the same arrays
    return run


def host_inputs(seed=0, dtype=np.float32):
    """x0, y (repeated labels), t (0 and 999 included: both branches of the loss) and noise, on the host."""
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((N, C, S, S)).astype(dtype)
    return x0, np.array([3, 3, 1, 3]), np.array([0, 1, 500, 999]), rng.standard_normal(x0.shape).astype(dtype)


def assert_close(name, got, ref, rtol=RTOL, atol=ATOL):
    got, ref = to_numpy(got), to_numpy(ref)
    assert (got.dtype, got.shape) == (ref.dtype, ref.shape), (name, got.dtype, ref.dtype, got.shape, ref.shape)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, err_msg=name)


def assert_close_to_scale(name, got, ref, rtol=GPU_RTOL):
    """max |got - ref| <= rtol * max |ref|: float32 from another device, where elements near zero carry the
    rounding of the large ones."""
    got, ref = to_numpy(got), to_numpy(ref)
    assert (got.dtype, got.shape) == (ref.dtype, ref.shape), (name, got.dtype, ref.dtype, got.shape, ref.shape)
    err, scale = float(np.abs(got - ref).max(initial=0.0)), float(np.abs(ref).max(initial=0.0))
    assert err <= rtol * scale + 1e-12, f"{name}: max |diff| {err:.3g} vs max |ref| {scale:.3g}"


def assert_weights_close(name, got, ref, steps):
    """Weights after `steps` AdamW steps. Adam's first steps move a weight by about +-lr whatever |g| is, so a
    gradient that is zero up to rounding may move it the other way on another device: such elements may differ by
    up to 2 lr per step, no more. (The key bias gets exactly such gradients: softmax ignores a shift shared by all
    keys.) Returns the fraction of elements that differ; the caller bounds it per backend."""
    got, ref = to_numpy(got), to_numpy(ref)
    assert got.dtype == ref.dtype == np.float32, name
    off = ~np.isclose(got, ref, rtol=RTOL, atol=ATOL)
    assert np.all(np.abs(got - ref)[off] <= 2 * LR * steps + ATOL), \
        f"{name}: {off.sum()} elements differ, max {np.abs(got - ref).max()}"
    return off.mean()


def arrays_in(obj):
    """Every array inside nested (named) tuples and lists: a model cache."""
    if hasattr(obj, "dtype") and hasattr(obj, "shape"):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from arrays_in(item)


# ---------------------------------------------------------------- (1) the training step of minidit.train
@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_train_step_matches_numpy_without_host_syncs(device_backend, tiny, latents, tmp_path, objective):
    ref, dev = (make_run(b, latents, tmp_path / b, objective=objective) for b in ("numpy", device_backend))
    for run in (ref, dev):
        run.train_step(0)  # the first step also moves the diffusion tables to the device, once
    ref_loss = ref.train_step(1)
    if device_backend == "strict":
        before = strict.sync_count()
        with strict.track() as traffic, strict.no_syncs():  # no_syncs raises at the offending line
            loss = dev.train_step(1)
        assert strict.sync_count() == before
        # only the step's inputs reach the device: x0, y, t, noise and the label-dropout mask
        assert len(traffic.uploads) <= 5, "\n".join(traffic.uploads)
    else:
        loss = dev.train_step(1)
    assert get_xp(loss) is dev.xp and loss.shape == () and loss.dtype == np.float32
    exact = device_backend == "strict"  # float32 on a GPU rounds otherwise: compared to each array's scale
    (assert_close if exact else assert_close_to_scale)("loss", loss, ref_loss)
    for name, p in ref.model.params.items():
        assert get_xp(dev.model.params[name]) is dev.xp
        off = [assert_weights_close(name, dev.model.params[name], p, steps=2),
               assert_weights_close("ema." + name, dev.ema.params[name], ref.ema.params[name], steps=2)]
        if exact:  # strict computes exactly as numpy: no gradient rounds the other way
            assert max(off) == 0, name
    assert set(dev.opt.m) == set(ref.opt.m) and dev.opt.t == ref.opt.t
    for name in ref.opt.m:
        if exact:
            assert_close("m." + name, dev.opt.m[name], ref.opt.m[name])
            assert_close("v." + name, dev.opt.v[name], ref.opt.v[name], atol=1e-9)
        else:
            assert_close_to_scale("m." + name, dev.opt.m[name], ref.opt.m[name])
            assert_close_to_scale("v." + name, dev.opt.v[name], ref.opt.v[name])


# ---------------------------------------------------------------- (2) the loss, and the model's gradients
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_loss_matches_numpy(device_backend, learn_sigma):
    rng = np.random.default_rng(1)
    dtype = COMPARE_DTYPE[device_backend]
    x0, _, t, noise = host_inputs(dtype=dtype)
    output = rng.standard_normal((N, 2 * C if learn_sigma else C, S, S)).astype(dtype)
    d = Diffusion("", learn_sigma=learn_sigma)
    ref = d.training_loss(output, x0, t, noise)
    xp = get_backend(device_backend)
    args = [to_device(a, xp) for a in (output, x0, t, noise)]
    with strict.no_syncs():
        loss, terms, dout = d.training_loss(*args)
    assert get_xp(loss, dout, *terms.values()) is xp
    assert_close("loss", loss, ref[0])
    assert set(terms) == set(ref[1])
    for k in terms:
        assert_close(k, terms[k], ref[1][k])
    assert_close("dout", dout, ref[2], atol=1e-8)


def test_forward_backward_matches_numpy(device_backend):
    results = {}
    for be in ("numpy", device_backend):
        dtype = COMPARE_DTYPE[device_backend]
        model, d = make_model(be, seed=2, dtype=dtype), Diffusion("")
        x0, y, t, noise = (to_device(a, model.xp) for a in host_inputs(dtype=dtype))
        with strict.no_syncs():
            x_t = d.q_sample(x0, t, noise)
            out, cache = model.forward(x_t, t, y, force_drop_ids=np.array([0, 1, 0, 0]))  # one label -> null class
            loss, _, dout = d.training_loss(out, x0, t, noise)
            grads, dx = model.backward(dout, cache, return_dx=True)
        results[be] = dict(out=out, loss=loss, dout=dout, dx=dx, **{"grad " + k: g for k, g in grads.items()})
    ref, got = results["numpy"], results[device_backend]
    assert list(got) == list(ref)
    for k in ref:
        assert get_xp(got[k]) is get_backend(device_backend), k
        if device_backend == "strict":
            assert_close(k, got[k], ref[k], atol=1e-6)
        else:  # float64, but the timestep sinusoid is float32 (official) and a GPU's cos may differ by an ulp
            assert_close_to_scale(k, got[k], ref[k], rtol=1e-5)


# ---------------------------------------------------------------- (3) sampling
def test_sampling_step_matches_numpy(device_backend):
    d = Diffusion("10")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, C, S, S)).astype(np.float32)
    model_output = rng.standard_normal((N, 2 * C, S, S)).astype(np.float32)
    t = np.array([9, 5, 1, 0])
    res = {}
    for be in ("numpy", device_backend):
        xp = get_backend(be)
        out_d, x_d, t_d = (to_device(a, xp) for a in (model_output, x, t))
        gen = xp.random.default_rng(7)
        with strict.no_syncs():
            res[be] = dict(d.p_mean_variance(out_d, x_d, t_d),
                           ddim=d.ddim_sample(out_d, x_d, t_d, gen, eta=0.0),
                           ddpm=d.p_sample(out_d, x_d, t_d, gen))
    for k in res["numpy"]:
        if k == "ddpm" and device_backend != "strict":  # CuPy's generator draws other numbers for the same seed
            assert res[device_backend][k].shape == x.shape
            continue
        assert_close(k, res[device_backend][k], res["numpy"][k], atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_generate_matches_numpy_and_syncs_once(device_backend, sampler):
    labels = [1, 2, 2]
    opts = dict(cfg_scale=4.0, sampler=sampler, seed=5, progress=False)
    dtype = COMPARE_DTYPE[device_backend]
    ref = generate(make_model("numpy", seed=3, dtype=dtype), labels, num_sampling_steps=3, threads=1,
                   **opts)  # one shard, as the device runs it: the same float sums, so strict matches to rounding
    model = make_model(device_backend, seed=3, dtype=dtype)
    if device_backend == "strict":
        generate(model, labels, num_sampling_steps=3, **opts)  # first use: the model's constant tables move once
        uploads = {}
        for steps in (6, 3):
            with strict.track() as traffic:
                got = generate(model, labels, num_sampling_steps=steps, **opts)
            assert len(traffic.syncs) == 1 and "sample.py" in traffic.syncs[0], traffic.syncs  # the final to_numpy
            uploads[steps] = len(traffic.uploads)
        assert uploads[3] == uploads[6], "a sampling step moves data host -> device"
        # labels already on the device are accepted too
        np.testing.assert_array_equal(generate(model, strict.asarray(labels), num_sampling_steps=3, **opts), got)
    else:
        got = generate(model, labels, num_sampling_steps=3, **opts)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (3, C, S, S)
    if device_backend == "strict":
        assert_close("samples", got, ref, atol=1e-4)
    elif sampler != "ddpm":  # DDPM on CuPy draws other noise; float32 sinusoid as in the forward test
        assert_close_to_scale("samples", got, ref, rtol=1e-5)
    else:
        assert np.isfinite(got).all()


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_rectified_flow_sampling_matches_numpy_and_syncs_once(sampler):
    from minidit.flow import RectifiedFlow

    opts = dict(objective=RectifiedFlow(shift=3.0), cfg_scale=4.0, sampler=sampler, seed=5, progress=False,
                num_sampling_steps=3)
    ref = generate(make_model("numpy", seed=3, learn_sigma=False), [1, 2, 2], threads=1, **opts)
    model = make_model("strict", seed=3, learn_sigma=False)
    generate(model, [1, 2, 2], **opts)  # first use: constant tables move once
    with strict.track() as traffic:
        got = generate(model, [1, 2, 2], **opts)
    assert len(traffic.syncs) == 1 and "sample.py" in traffic.syncs[0], traffic.syncs  # the final to_numpy
    np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------- (4) checkpoints
def test_checkpoint_round_trip(device_backend, tiny, latents, tmp_path):
    run = make_run(device_backend, latents, tmp_path / "a")
    for k in range(2):
        run.train_step(k)
    run.step = 2
    path = tmp_path / "checkpoint.npz"
    run.save(path)
    arrays, meta = load_checkpoint(path)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays.values())
    assert meta["args"]["backend"] == device_backend

    again = make_run(device_backend, latents, tmp_path / "b", seed=9)  # other weights, then loaded
    again.load(path)
    assert again.step == 2 and again.opt.t == run.opt.t and again.ema.num_updates == run.ema.num_updates
    pairs = [(again.model.params, run.model.params), (again.ema.params, run.ema.params),
             (again.opt.m, run.opt.m), (again.opt.v, run.opt.v)]
    for loaded, saved in pairs:
        assert set(loaded) == set(saved)
        for k in saved:
            assert get_xp(loaded[k]) is run.xp and loaded[k].dtype == np.float32, k
            np.testing.assert_array_equal(to_numpy(loaded[k]), to_numpy(saved[k]), err_msg=k)
    model = load_model(path, backend=device_backend)  # the EMA weights, on the device
    for k, v in run.ema.params.items():
        assert get_xp(model.params[k]) is run.xp
        np.testing.assert_array_equal(to_numpy(model.params[k]), to_numpy(v), err_msg=k)
    # a resumed run continues as the original (exactly on strict; a GPU may schedule its sums differently)
    assert_close("loss after resuming", again.train_step(2), run.train_step(2),
                 rtol=0 if device_backend == "strict" else 1e-6, atol=0)


# ---------------------------------------------------------------- (5) label embedding backward
def test_label_embedding_backward_with_repeated_labels(backend):
    xp = get_backend(backend)
    rng = np.random.default_rng(4)
    labels = np.array([3, 3, 3, 1, 0, 3, 1, 10])  # repeats, and the null class
    table = rng.standard_normal((11, 5)).astype(np.float32)
    dout = rng.standard_normal((8, 5)).astype(np.float32)
    expected = np.zeros_like(table)
    np.add.at(expected, labels, dout)  # the scatter-add, on the host
    emb, cache = embedding_forward(to_device(labels, xp), to_device(table, xp))
    np.testing.assert_array_equal(to_numpy(emb), table[labels])
    dout_d = to_device(dout, xp)
    with strict.no_syncs():
        first, second = embedding_backward(dout_d, cache), embedding_backward(dout_d, cache)
    assert get_xp(first) is xp and first.dtype == np.float32
    np.testing.assert_allclose(to_numpy(first), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(to_numpy(first), to_numpy(second))  # deterministic


# ---------------------------------------------------------------- (6) float32 stays float32
def test_float32_everywhere(backend):
    model, d = make_model(backend, seed=5), Diffusion("")
    xp = model.xp
    x0, y, t, noise = (to_device(a, xp) for a in host_inputs())
    out, cache = model.forward(d.q_sample(x0, t, noise), t, y, train=True, rng=np.random.default_rng(0))
    loss, terms, dout = d.training_loss(out, x0, t, noise)
    grads = model.backward(dout, cache)
    cached = list(arrays_in(cache))
    assert len(cached) > 50
    for a in cached:
        assert get_xp(a) is xp, f"a {type(a).__name__} in the cache of a {backend} model"
        assert a.dtype == np.float32 or a is cache.y_embedder.labels, f"cache array {a.shape} is {a.dtype}"
    for name, a in [("out", out), ("loss", loss), ("dout", dout), *terms.items(), *grads.items()]:
        assert get_xp(a) is xp and a.dtype == np.float32, f"{name} is {a.dtype}"
    assert set(grads) == set(model.trainable())


# ---------------------------------------------------------------- the command lines on the strict backend
def test_cli_train_and_sample_on_strict(tiny, latents, tmp_path, capsys):
    run = tmp_path / "run"
    train_mod.main(["--backend", "strict", "--variant", TINY, "--data", latents, "--batch-size", str(N),
                    "--steps", "2", "--log-every", "1", "--sample-steps", "2", "--out", str(run)])
    log = (run / "log.txt").read_text()
    assert "backend strict" in log and "(step=0000002) Train Loss: " in log
    assert (run / "samples.png").exists()
    grid = tmp_path / "grid.png"
    sample_main(["--backend", "strict", "--ckpt", str(run), "--class-labels", "1", "2", "--num-sampling-steps", "2",
                 "--sampler", "ddim", "--out", str(grid)])
    assert grid.exists()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_mod.parse_args(["--help"])
    assert "strict" in capsys.readouterr().out and "strict" in BACKENDS


# ---------------------------------------------------------------- (7) the strict backend itself
@pytest.fixture
def a():
    return strict.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))


HOST = np.ones((2, 3), dtype=np.float32)
REFUSED = {
    "np.asarray(a)": lambda a: np.asarray(a),
    "np.array([a, a])": lambda a: np.array([a, a]),
    "np.sum(a) (__array_function__)": lambda a: np.sum(a),
    "np.exp(a) (__array_ufunc__)": lambda a: np.exp(a),
    "np.add(a, host)": lambda a: np.add(a, HOST),
    "np.testing on a device array": lambda a: np.testing.assert_allclose(a, a),
    "a + host": lambda a: a + HOST,
    "host + a": lambda a: HOST + a,
    "a * host 0-d": lambda a: a * np.array(2.0, np.float32),
    "host 0-d * a": lambda a: np.array(2.0, np.float32) * a,
    "a @ host": lambda a: a @ HOST.T,
    "host @ a": lambda a: HOST.T @ a,
    "a == host": lambda a: a == HOST,
    "a += host": lambda a: a.__iadd__(HOST),
    "xp.add(a, host)": lambda a: strict.add(a, HOST),
    "xp.where(a > 0, a, host)": lambda a: strict.where(a > 0, a, HOST),
    "xp.concatenate([a, host])": lambda a: strict.concatenate([a, HOST]),
    "xp.exp(a, out=host)": lambda a: strict.exp(a, out=np.empty((2, 3), np.float32)),
    "a[host index]": lambda a: a[np.array([0, 1])],
    "a[...] = host": lambda a: a.__setitem__(Ellipsis, HOST),
    "a + list": lambda a: a + [1.0, 2.0, 3.0],
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_strict_refuses_host_arrays(a, name):
    with pytest.raises(TypeError, match=r"minidit\.xp\.to_(numpy|device)"):  # each message names the fix
        REFUSED[name](a)


def test_strict_scalars_reductions_indexing(a):
    host = to_numpy(a)
    for got, want in [(a * 2, host * 2), (2 * a, 2 * host), (a * np.float32(2), host * np.float32(2)),
                      (np.float32(2) * a, np.float32(2) * host), (np.float32(2) < a, np.float32(2) < host),
                      (1 - a, 1 - host), (-a, -host), (abs(a - 3), abs(host - 3)), (a @ a.T, host @ host.T),
                      (a.sum(), host.sum()), (strict.sum(a), host.sum()), (a.max(axis=0), host.max(axis=0)),
                      (a.mean(axis=-1, keepdims=True), host.mean(axis=-1, keepdims=True)), (a.std(), host.std()),
                      (a[1, 2], host[1, 2]), (a[strict.asarray([1, 0])], host[[1, 0]]), (a.T, host.T),
                      (a.reshape(3, 2), host.reshape(3, 2)), (a.astype(np.float64), host.astype(np.float64)),
                      (strict.where(a > 2, a, 0.0), np.where(host > 2, host, 0.0))]:
        assert type(got) is strict.StrictArray  # full reductions and a[i, j] are 0-d arrays, as on CuPy
        assert_close("", got, np.asarray(want))
    assert a.shape == (2, 3) and a.ndim == 2 and a.size == 6 and a.dtype == np.float32 and len(a) == 2
    assert [type(r) for r in a] == [strict.StrictArray] * 2 and [r.shape for r in a[0]] == [()] * 3
    with pytest.raises(TypeError, match="mixing host and device"):
        np.exp(a, out=HOST.copy())
    assert get_xp(a) is strict and get_xp(HOST, a) is strict and isinstance(a, strict.ndarray)
    assert strict.get_array_module(a) is strict and strict.get_array_module(HOST) is np
    assert strict.float32 is np.float32 and strict.int64 is np.int64 and strict.pi == np.pi
    assert strict.newaxis is None and strict.dtype is np.dtype
    assert repr(a).startswith("strict.array(")


def test_strict_in_place_and_out(a):
    view, alias = a[0], a
    a += 1
    a *= strict.asarray(np.float32(2))
    assert a is alias and to_numpy(view).tolist() == [2.0, 4.0, 6.0]  # the view saw both in-place updates
    idx = strict.asarray([0, 0, 1])
    a[idx] = 0.5  # device index, scalar value
    a[1] = strict.zeros(3, dtype=strict.float32)  # device value
    assert to_numpy(a).tolist() == [[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]]
    a[0, 1] += 1
    assert to_numpy(a)[0, 1] == 1.5
    o = strict.empty_like(a)
    o_view = o[1]
    assert strict.exp(a, out=o) is o and strict.multiply(a, 2, o) is o  # keyword and positional out
    assert_close("out", o_view, 2 * to_numpy(a)[1])
    assert strict.subtract(1, a, out=a) is a and to_numpy(a)[0, 0] == 0.5
    s = strict.empty((3,), dtype=np.float32)
    assert a.sum(axis=0, out=s) is s
    assert_close("sum out", s, to_numpy(a).sum(axis=0))
    c = strict.empty((4, 3), dtype=np.float32)
    assert strict.concatenate([a, a], axis=0, out=c) is c


def test_strict_transfers_and_sync_counting(a):
    host = np.arange(3, dtype=np.float32)
    with strict.track() as traffic:
        d = to_device(host, strict)
        host[0] = 99  # a transfer copies: the device array does not see later host writes
        assert type(d) is strict.StrictArray and to_numpy(d)[0] == 0
        got = a.get()
        assert type(got) is np.ndarray and got is not a.get()
        before = strict.sync_count()
        assert float(a[0, 1]) == 1.0 and int(a[1, 0]) == 3 and a[1, 2].item() == 5.0 and bool(a[0, 1])
        assert f"{a[0, 1]:.1f}" == "1.0" and a[0].tolist() == [0.0, 1.0, 2.0]
        assert strict.sync_count() == before + 6
        a[a > 2]  # boolean-mask indexing reads the result size on the host
    assert len(traffic.uploads) == 1 and len(traffic.syncs) == 10
    assert all(__file__ in s for s in traffic.syncs), traffic.syncs  # each names the line that synced
    with strict.no_syncs(), pytest.raises(strict.HostSyncError, match=r"float\(\).*test_backends\.py"):
        float(a[0, 0])
    with strict.no_syncs():
        a + 1, a.sum(), strict.exp(a), a[0, 1]  # device work is fine


def test_strict_random_and_unsupported(a):
    gen, ref = strict.random.default_rng(0), np.random.default_rng(0)
    z = gen.standard_normal((2, 3), dtype=strict.float32)
    assert type(z) is strict.StrictArray and z.dtype == np.float32
    np.testing.assert_array_equal(to_numpy(z), ref.standard_normal((2, 3), dtype=np.float32))  # numpy's streams
    assert type(gen.integers(0, 10, size=4)) is strict.StrictArray and gen.random().shape == ()
    for bad in (lambda: a.not_an_attribute, lambda: strict.errstate, lambda: strict.random.seed,
                lambda: strict.save, lambda: strict.testing):
        with pytest.raises(AttributeError, match="strict"):
            bad()
    with pytest.raises(TypeError, match="Unsupported type"):
        strict.add(a, [1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="dtype object"):
        strict.asarray([object()])


def test_forward_names_inputs_left_on_the_host(device_backend):
    model = make_model(device_backend)
    x0, y, t, _ = host_inputs()
    with pytest.raises(TypeError, match="^t is a numpy array"):
        model.forward(to_device(x0, model.xp), t, to_device(y, model.xp))


def test_numpy_backend_reuses_freed_host_memory():
    """After get_backend("numpy"), a step's large temporaries come back from malloc's free lists instead of fresh,
    page-faulting mmaps: allocating and freeing the same 8 MiB array again costs (almost) no page faults."""
    resource = pytest.importorskip("resource")
    from minidit.threads import keep_freed_host_memory

    get_backend("numpy")
    if not keep_freed_host_memory():
        pytest.skip("not glibc: malloc cannot be tuned here")
    x = np.ones(2 << 20, dtype=np.float32)  # 8 MiB
    (x * 2).sum()  # the first product may grow the heap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        (x * 2).sum()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 100, f"{faults} page faults for 20 reused 8 MiB temporaries (2048 each if they were mmapped)"
