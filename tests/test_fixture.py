"""minidit against the PyTorch reference without PyTorch: a committed float64 fixture, tensor by tensor (llm.c's
test_gpt2.c against gpt2_124M_debug_state.bin).

tests/fixtures/tiny_dit_f64.npz was written by the independent PyTorch implementation of the official DiT
(minidit/dev/torch_reference.py) with autograd and torch.optim.AdamW:

    python -m minidit.dev.torch_reference --write-fixture tests/fixtures/tiny_dit_f64.npz

It holds a tiny DiT (depth 2, D 8, 2 heads, patch 2, 8 x 8 x 3 inputs, 5 classes) at random parameters, a batch
with t = 0 and t > 0 and the null class, the noised input, the output, the loss and its terms, d loss / d output,
every parameter gradient, the input gradient, and the losses of 5 AdamW steps on that batch. The timestep sinusoid
is NumPy's float32 one on both sides (torch's float32 exp differs by an ulp; test_torch_reference.py checks that part).
Run `pytest -s tests/test_fixture.py` to see the table.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from minidit import DiT, DiTConfig
from minidit.diffusion import Diffusion
from minidit.optim import AdamW

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_dit_f64.npz"
TOL = 1e-10  # relative to each tensor's largest entry; float64 rounding gives ~1e-14, a wrong formula > 1e-3


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def model_from(ref):
    c = json.loads(str(ref["meta"]))
    model = DiT(DiTConfig(c["depth"], c["hidden_size"], c["num_heads"], c["patch_size"]), input_size=c["input_size"],
                in_channels=c["in_channels"], num_classes=c["num_classes"], dtype=np.float64)
    model.load_state_dict({k[len("param."):]: v for k, v in ref.items() if k.startswith("param.")})
    return model, c


class Table:
    """One line per tensor: name, shape, maxdiff, rel = maxdiff / max|ref|; fails at the end naming every tensor over."""

    def __init__(self):
        self.bad = []
        print(f"\n{'tensor':40s} {'shape':>14s} {'maxdiff':>10s} {'rel':>9s}")

    def check(self, name, ours, want):
        assert np.shape(ours) == np.shape(want), f"{name}: shape {np.shape(ours)} vs reference {np.shape(want)}"
        diff = float(np.max(np.abs(np.asarray(ours) - want)))
        rel = diff / max(float(np.max(np.abs(want))), 1e-300)
        print(f"{name:40s} {str(np.shape(want)):>14s} {diff:10.2e} {rel:9.1e} {'OK' if rel <= TOL else 'NOT OK'}")
        if not rel <= TOL:
            self.bad.append(f"{name}: rel {rel:.2e}")

    def done(self):
        assert not self.bad, "over tolerance: " + "; ".join(self.bad)


def test_fixture_is_small_and_complete(ref):
    assert FIXTURE.stat().st_size < 300_000
    model, _ = model_from(ref)
    assert {k[len("grad."):] for k in ref if k.startswith("grad.")} == set(model.trainable())


def test_forward_loss_and_every_gradient_match_the_reference(ref):
    model, _ = model_from(ref)
    diffusion = Diffusion("")
    table = Table()
    x_t = diffusion.q_sample(ref["x0"], ref["t"], ref["noise"])
    table.check("x_t", x_t, ref["x_t"])
    out, cache = model.forward(ref["x_t"], ref["t"], ref["y"])
    table.check("output", out, ref["out"])
    loss, terms, dout = diffusion.training_loss(out, ref["x0"], ref["t"], ref["noise"])
    table.check("loss", loss, ref["loss"])
    for k in ("mse", "vb", "loss"):
        table.check(f"terms.{k}", terms[k], ref[f"terms.{k}"])
    table.check("d loss / d output", dout, ref["dout"])
    grads, dx = model.backward(ref["dout"], cache, return_dx=True)
    for name, g in grads.items():
        table.check("d " + name, g, ref["grad." + name])
    table.check("d x_t", dx, ref["dx_t"])
    table.done()


def test_adamw_loss_trajectory_matches_the_reference(ref):
    model, c = model_from(ref)
    diffusion = Diffusion("")
    opt = AdamW(model.params, lr=c["lr"], weight_decay=c["weight_decay"])
    x0, t, y, noise = ref["x0"], ref["t"], ref["y"], ref["noise"]
    losses = []
    for _ in range(c["steps"]):  # the same batch every step, as the reference did
        out, cache = model.forward(diffusion.q_sample(x0, t, noise), t, y)
        loss, _, dout = diffusion.training_loss(out, x0, t, noise)
        opt.step(model.params, model.backward(dout, cache))
        losses.append(float(loss))
    print("\nlosses  minidit", np.round(losses, 12).tolist(), "\n        torch  ", np.round(ref["losses"], 12).tolist())
    assert losses[-1] < losses[0]  # the steps train
    np.testing.assert_allclose(losses, ref["losses"], rtol=TOL, atol=0)
