"""Dynamic DiT (minidit.dynamic): the backward with every gate, DyDiT's FLOPs loss, the sliced sampler against the
masked forward, the start at the parent, and fine-tune -> sample -> resume through the commands."""
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minidit import train as train_mod
from minidit.backend import get_backend
from minidit.checkpoint import load_checkpoint, load_model
from minidit.dev import strict
from minidit.dynamic import DynamicDiT, gate_backward, gate_forward
from minidit.gradcheck import numerical_grad, rel_error, sampled_errors
from minidit.model import DiT, DiTConfig
from minidit.sample import main as sample_main
from minidit.threads import ShardedDiT
from minidit.xp import to_device, to_numpy

TINY = DiTConfig(depth=2, hidden_size=8, num_heads=2, patch_size=2)


def tiny_dynamic(dynamic, seed=0, scale=0.3, dtype=np.float64, backend="numpy"):
    """A Dynamic DiT with every parameter random (routers included, so gates differ between timesteps)."""
    model = DynamicDiT(TINY, input_size=4, in_channels=2, num_classes=3, dtype=dtype, dynamic=dynamic,
                       backend=backend)
    rng = np.random.default_rng(seed + 100)
    model.load_state_dict({k: (rng.standard_normal(s) * scale if k != "pos_embed" else to_numpy(model.params[k]))
                           for k, s in model.param_shapes().items()})
    return model


def inputs(seed=7, n=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 2, 4, 4)), np.array([0, 400, 999][:n]), np.array([2, 3, 0][:n])


def check_model_gradients(model, hard, skip=()):
    """Every gradient (and dx) of model.backward against central differences of sum(out * dout); returns the worst
    relative error. `skip`: name fragments to leave out."""
    x, t, y = inputs()
    out, cache = model.forward(x, t, y, hard=hard)
    rng = np.random.default_rng(1)
    dout = rng.standard_normal(out.shape)
    grads, dx = model.backward(dout, cache, return_dx=True)
    assert set(grads) == set(model.params) - {"pos_embed"}

    def loss():
        return np.sum(model.forward(x, t, y, hard=hard)[0] * dout)

    checked = {k: g for k, g in {**grads, "x": dx}.items() if not any(s in k for s in skip)}
    errors = sampled_errors(loss, checked, {**model.params, "x": x}, 20, rng)
    for name, (err, norm) in errors.items():
        assert norm > 0 or name.endswith("embedding_table.weight"), f"{name}: vacuous check"
        assert err < 1e-6, f"{name}: relative error {err:.2e}"
    return max(e for e, _ in errors.values())


@pytest.mark.parametrize("dynamic", ["width", "depth"])
def test_backward_with_soft_gates_matches_finite_differences(dynamic):
    """Soft gates sigmoid(logit) make the whole model differentiable: then every gradient, the routers' and the
    timestep embedder's included, is checked numerically. The hard (straight-through) backward is the same code."""
    check_model_gradients(tiny_dynamic(dynamic), hard=False)


@pytest.mark.parametrize("dynamic", ["width", "depth"])
def test_backward_with_hard_gates_matches_finite_differences_off_the_routers(dynamic):
    """Hard gates are locally constant, so every gradient except the straight-through ones (routers, and the
    timestep embedder that feeds them) is a true gradient."""
    model = tiny_dynamic(dynamic, seed=2)  # a seed where every router has gates on and off in this batch
    x, t, y = inputs()
    gates = [g for block in model.route(model.embed(x, t, y, False, None, None)[1])[0] for g in block]
    assert all(0 < g.mean() < 1 for g in gates), "the check needs gates both on and off"
    check_model_gradients(model, hard=True, skip=("_router", "t_embedder"))


def test_gate_is_hard_forward_and_sigmoid_backward():
    logits = np.array([[-2.0, -1e-3, 0.5, 30.0]])
    hard, cache = gate_forward(logits)
    np.testing.assert_array_equal(hard, [[0, 0, 1, 1]])
    soft, _ = gate_forward(logits, hard=False)
    dg = np.array([[0.3, -1.0, 2.0, 1.0]])
    num = numerical_grad(lambda: np.sum(gate_forward(logits, hard=False)[0] * dg), logits)
    np.testing.assert_allclose(gate_backward(dg, cache), num, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(soft, 1 / (1 + np.exp(-logits)))


@pytest.mark.parametrize("dynamic", ["width", "depth"])
def test_flops_loss_and_its_gradients(dynamic):
    model = tiny_dynamic(dynamic)
    t = np.array([3.0, 500.0, 999.0])
    loss, r, grads = model.flops_loss(t, 0.4, hard=False)
    assert set(grads) == {k for k in model.params if "_router" in k or k.startswith("t_embedder")}
    for name, g in grads.items():
        num = numerical_grad(lambda: float(model.flops_loss(t, 0.4, hard=False)[0]), model.params[name])
        assert rel_error(g, num, floor=1e-6) < 1e-6, name
    # the hard ratio is the sub-network's share of the routed MACs, as macs_at counts the sub-network
    _, r, _ = model.flops_loss(t, 0.4)
    _, _, routed = model.block_parts()  # width: the blocks' attention and MLP; depth: whole blocks
    fixed = model.gmacs() * 1e9 - routed  # what no router switches off
    assert float(r) == pytest.approx(np.mean([(model.macs_at(tt) - fixed) / routed for tt in t]), rel=1e-9)


def test_all_on_and_all_off():
    """The initial routers switch everything on: the Dynamic DiT is exactly its parent, ratio 1. Routers pushed
    negative switch everything off: ratio 0, and the sliced sampler still computes the masked forward."""
    parent = DiT(TINY, input_size=4, in_channels=2, num_classes=3, dtype=np.float64, seed=3)
    rng = np.random.default_rng(0)
    for k, v in parent.params.items():
        if k != "pos_embed":
            v[...] = 0.3 * rng.standard_normal(v.shape)
    x, t, y = inputs()
    for dynamic in ("width", "depth"):
        model = DynamicDiT(TINY, input_size=4, in_channels=2, num_classes=3, dtype=np.float64, dynamic=dynamic)
        model.load_parent(parent.params)
        np.testing.assert_allclose(model.forward(x, t, y)[0], parent.forward(x, t, y)[0], rtol=1e-12, atol=1e-13)
        tu = np.full(3, 500)  # the sampler's path runs DiT's own blocks on every weight: the very same numbers
        np.testing.assert_array_equal(model.forward(x, tu, y, cache=False)[0], parent.forward(x, tu, y)[0])
        assert float(model.flops_loss(t, 0.5)[1]) == 1.0
        for k in model.params:
            if k.endswith("_router.bias"):
                model.params[k][...] = -50.0
        model.load_state_dict(model.params)  # drops the cut slices
        assert float(model.flops_loss(t, 0.5)[1]) == 0.0
        for tt in (0, 999):
            tu = np.full(3, tt)
            np.testing.assert_allclose(model.forward(x, tu, y, cache=False)[0], model.forward(x, tu, y)[0],
                                       rtol=1e-12, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), dynamic=st.sampled_from(["width", "depth"]), t=st.integers(0, 999))
def test_sliced_sub_network_equals_the_masked_forward(seed, dynamic, t):
    model = tiny_dynamic(dynamic, seed=seed, scale=0.6)
    x, _, y = inputs(seed)
    tu = np.full(3, t)
    sliced, cache = model.forward(x, tu, y, cache=False)
    assert cache is None and model.timesteps_routed() == [float(t)]
    np.testing.assert_allclose(sliced, model.forward(x, tu, y)[0], rtol=1e-10, atol=1e-12)
    macs = model.macs_at(t)
    assert macs <= model.gmacs() * 1e9 + 0.5


def test_sliced_path_is_cut_once_per_timestep_and_sharded_threads_agree():
    model = tiny_dynamic("width", scale=0.6)
    x, _, y = inputs(n=3)
    tu = np.full(3, 250)
    one = model.forward(x, tu, y, cache=False)[0]
    first = model.subnetwork_at(250)
    assert model.timesteps_routed() == [250.0]
    two = ShardedDiT(model, threads=2).forward(x, tu, y, cache=False)[0]
    assert model.subnetwork_at(250) is first  # reused, not cut again
    np.testing.assert_allclose(two, one, rtol=1e-12, atol=1e-12)
    view = model.using({k: v.copy() for k, v in model.params.items()})
    assert view.timesteps_routed() == []  # other weights: other sub-networks
    model.forward(x, tu, y, train=True)
    assert model.timesteps_routed() == []  # a training forward: the weights are about to change


def test_sub_networks_are_shared_between_timesteps_and_bounded(monkeypatch):
    monkeypatch.setattr("minidit.dynamic.MAX_SUBNETWORKS", 2)
    model = tiny_dynamic("width", scale=0.6)
    for t in range(0, 1000, 10):
        model.subnetwork_at(t)
    patterns = set(model._routes.values())
    assert len(model.timesteps_routed()) == 100
    assert 1 < len(patterns) < 100 and len(model._subnetworks) == 2  # one cut per pattern, two kept
    x, _, y = inputs()
    for t in (0, 500, 990, 0):  # evicted and cut again: the same numbers
        tu = np.full(3, t)
        np.testing.assert_allclose(model.forward(x, tu, y, cache=False)[0], model.forward(x, tu, y)[0],
                                   rtol=1e-12, atol=1e-12)


def test_strict_backend_runs_both_paths_like_numpy():
    ref = tiny_dynamic("width", dtype=np.float32, scale=0.6)
    dev = tiny_dynamic("width", dtype=np.float32, scale=0.6, backend="strict")
    xp = get_backend("strict")
    x, t, y = inputs()
    x = x.astype(np.float32)
    out, cache = dev.forward(*(to_device(a, xp) for a in (x, t, y)))
    ref_out, ref_cache = ref.forward(x, t, y)
    np.testing.assert_allclose(to_numpy(out), ref_out, rtol=1e-5, atol=1e-6)
    dout = np.random.default_rng(0).standard_normal(out.shape).astype(np.float32)
    g, g_ref = dev.backward(to_device(dout, xp), cache), ref.backward(dout, ref_cache)
    for k in g_ref:
        np.testing.assert_allclose(to_numpy(g[k]), g_ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
    tu = np.full(3, 640)
    np.testing.assert_allclose(to_numpy(dev.forward(*(to_device(a, xp) for a in (x, tu, y)), cache=False)[0]),
                               ref.forward(x, tu, y, cache=False)[0], rtol=1e-5, atol=1e-6)
    with strict.no_syncs():  # the FLOPs loss stays on the device
        dev.flops_loss(to_device(t.astype(np.float32), xp), 0.5)


FAST = ["--variant", "mini/4", "--batch-size", "4", "--log-every", "2", "--sample-steps", "2"]


def test_finetune_sample_and_resume_through_the_commands(tmp_path):
    parent, dyn, dep = (str(tmp_path / n) for n in ("parent", "dyn", "dep"))
    train_mod.main(FAST + ["--steps", "2", "--out", parent, "--no-final-samples"])
    train_mod.main(["--finetune", parent, "--dynamic", "width", "--target-ratio", "0.5", "--target-warmup", "2",
                    "--steps", "4", "--ckpt-every", "2", "--batch-size", "4", "--log-every", "2", "--sample-steps",
                    "2", "--out", dyn])
    _, meta = load_checkpoint(os.path.join(dyn, "checkpoint.npz"))
    assert meta["model"]["kind"] == "dydit" and meta["model"]["dynamic"] == "width"
    assert meta["args"]["variant"] == "mini/4" and meta["args"]["finetune"].startswith(parent)
    log = open(os.path.join(dyn, "log.txt")).read()
    assert "flops_ratio: " in log and "flops_target: " in log and os.path.exists(os.path.join(dyn, "samples.png"))
    model = load_model(dyn)
    assert isinstance(model, DynamicDiT) and model.dynamic == "width"
    grid = str(tmp_path / "g.png")
    sample_main(["--ckpt", dyn, "--class-labels", "1", "2", "--num-sampling-steps", "3", "--out", grid])
    assert os.path.exists(grid)
    train_mod.main(["--resume", dyn, "--steps", "6"])
    assert load_checkpoint(os.path.join(dyn, "checkpoint.npz"))[1]["step"] == 6
    train_mod.main(["--finetune", parent, "--dynamic", "depth", "--steps", "2", "--batch-size", "4",
                    "--no-final-samples", "--out", dep])
    assert load_model(dep).dynamic == "depth"


def test_finetune_errors_name_the_fix(tmp_path):
    parent = str(tmp_path / "parent")
    train_mod.main(FAST + ["--steps", "1", "--out", parent, "--no-final-samples"])
    with pytest.raises(SystemExit, match="--variant from the parent"):
        train_mod.main(["--finetune", parent, "--dynamic", "width", "--variant", "mini/8", "--out",
                        str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no checkpoint"):
        train_mod.main(["--finetune", str(tmp_path / "missing"), "--dynamic", "width", "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match=r"ConditioningDiT \(--block cross-attention\) and DynamicDiT \(--dynamic width\)"):
        train_mod.main(FAST + ["--dynamic", "width", "--block", "cross-attention", "--steps", "1", "--out",
                               str(tmp_path / "z")])
    with pytest.raises(ValueError, match="unknown dynamic mode"):
        DynamicDiT(TINY, input_size=4, in_channels=2, num_classes=3, dynamic="tokens")
