"""SGD.lr_scale survives Simulator.set_lr (the training loop sets lr every epoch)."""

import numpy as np
import pytest

from neurosim import SGD, Simulator, compile_plan
from neurosim.models import build_pepita_network


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("style", ["reference", "torch"])
def test_set_lr_keeps_per_projection_scale(fuse, style):
    rng = np.random.default_rng(0)
    X = rng.random((8, 12), dtype=np.float32)
    Y = rng.integers(0, 3, 8)
    updates = {}
    for scale in (1.0, 0.25):
        net = build_pepita_network((12, 6, 3), dropout=0.0)
        opt = SGD(lr=0.3, momentum=0.0, style=style, lr_scale={"W2": scale})
        sim = Simulator(compile_plan(net.circuit, net.protocol, rules=[net.rule], optimizer=opt,
                                     batch=8, seed=0, fuse=fuse))
        sim.set_lr(0.2)
        w0 = {k: v.copy() for k, v in sim.weights.items()}
        sim.train(X, Y)
        updates[scale] = {k: sim.weights[k] - w0[k] for k in ("W1", "W2")}
    # one step from the same state: W1 unaffected, W2's step scaled by exactly the factor
    np.testing.assert_array_equal(updates[1.0]["W1"], updates[0.25]["W1"])
    # the step is read back as W - W0 with |W| < 1 in float32: each difference carries up to
    # ~1 ulp of W (6e-8), so compare with atol 2e-7 on top of a float32 rtol
    np.testing.assert_allclose(updates[0.25]["W2"], 0.25 * updates[1.0]["W2"], rtol=1e-5,
                               atol=2e-7)
