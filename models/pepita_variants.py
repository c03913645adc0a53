"""PEPITA variants (ICLR 2024) as ready-made networks and scenario models.

* ``pepita_norm``  activation normalization (:class:`~neurosim.plasticity.pepita_variants.
  NormalizedPEPITA`), per sample by default, ``norm = "batch"`` for the released code's
  whole-batch Frobenius norm;
* ``pepita_wm``    weight mirroring of F (:class:`~neurosim.plasticity.pepita_variants.
  WeightMirroring`): F = B_1 ... B_L with factor projections ``B1`` .. ``BL`` in the circuit
  (inactive in every phase; ``angle:B1`` monitors the angle between B_1 and W_1^T,
  ``angle:F`` the angle between F and (W_L ... W_1)^T);
* ``pepita_hebbian`` the Hebbian form (:class:`~neurosim.plasticity.contrastive.PepitaHebbian`):
  ``h_l h_{l-1}^T - h~_l h~_{l-1}^T``, the two-phase contrastive rule Forward-Forward also is;
* ``pepita_tl``    time-local PEPITA (:class:`~neurosim.plasticity.pepita_variants.
  PEPITATimeLocal`), SGD steps at the ends of the two passes.

Weight decay (``training.weight_decay``) and depth (``model.sizes``) need no new model: they are
scenarios of the ``pepita`` model. All circuits are :func:`models.pepita.build_pepita_network`'s,
so the same seed gives the same initial forward weights and dropout masks.
"""

from __future__ import annotations

import math

from neurosim import SGD, Normal, ValidationError
from neurosim.plasticity.contrastive import PepitaHebbian
from neurosim.plasticity.pepita_variants import (NormalizedPEPITA, PEPITATimeLocal,
                                                 WeightMirroring)

from .pepita import PEPITA_SCHEMA, PepitaNetwork, build_pepita_network

def wm_factor_std(sizes, f_scale=0.05) -> float:
    """Std s of the entries of each factor B_l: ``(sd_F / sqrt(prod hidden))^(1/L)`` with
    ``sd_F = f_scale sqrt(2 / d_in)``, so that std(B_1 ... B_L) ~ sd_F."""
    sizes = tuple(sizes)
    L = len(sizes) - 1
    sd_f = f_scale * math.sqrt(2.0 / sizes[0])
    return (sd_f / math.sqrt(math.prod(sizes[1:-1]))) ** (1.0 / L)


def build_pepita_wm_network(sizes=(784, 1024, 10), *, mirroring=True, wm_lr=0.1, wm_wd=0.5,
                            wm_noise=0.1, wm_noise_dist="rademacher", premirror_epochs=0,
                            wm_period=1, trials_per_epoch=None,
                            f_scale=0.05, convention="iclr2024", **kw):
    """A PEPITA network whose F is the product of factors B_1 ... B_L, N(0, s^2) each
    (:func:`wm_factor_std`), and the rules ``[PEPITA, WeightMirroring]`` (``mirroring=False``:
    mirroring with lr = 0, i.e. the same factorized F, rescaled to std sd_F and never mirrored --
    the control). Returns ``(network, rules)``. The schedule (``premirror_epochs``,
    ``wm_period``) follows the epoch that ``Simulator.set_epoch`` sets; ``trials_per_epoch`` is
    deprecated and ignored (passed on to the rule, which warns).

    The default convention is ``iclr2024`` (s = -1): with a mirrored F that sign makes the
    modulation descend (algorithms.md 1.1)."""
    net = build_pepita_network(sizes, convention=convention, f_scale=f_scale, **kw)
    c = net.circuit
    pops = ["input"] + [p for p in c.populations if p.startswith("hidden")] + ["output"]
    s = wm_factor_std(sizes, f_scale)
    factors = []
    for l in range(len(pops) - 1):
        factors.append(f"B{l + 1}")
        # B_l shaped like W_l^T: post = W_l's pre, pre = W_l's post; active in no phase
        c.feedback(pops[l + 1], pops[l], name=factors[-1], init=Normal(std=s), phases=())
    # mirroring=False: the same rule with lr = 0 keeps F = B_1 ... B_L (rescaled to sd_F) and
    # never changes the factors; the schedule is then irrelevant
    wm = WeightMirroring(factors=tuple(factors), feedback="F", lr=wm_lr if mirroring else 0.0,
                         wd=wm_wd, noise=wm_noise, noise_dist=wm_noise_dist, f_scale=f_scale,
                         premirror_epochs=premirror_epochs if mirroring else 0,
                         period=wm_period if mirroring else 1,
                         trials_per_epoch=trials_per_epoch)
    return net, [net.rule, wm]


def _common(s):
    m, sim = s["model"], s["simulation"]
    if len(m["sizes"]) < 3 or min(m["sizes"]) < 1:
        raise ValidationError("model.sizes", f"got {m['sizes']}, expected [d_in, hidden..., "
                              "n_out] with at least one hidden layer and sizes >= 1.")
    return dict(convention=m["convention"], f_scale=m["f_scale"], dropout=m["dropout"],
                hidden=m["hidden"], mode=sim["mode"], tau=sim["tau"], dt=sim["dt"],
                phase_duration=sim["phase_duration"], method=sim["method"],
                presynaptic=m["presynaptic"], last_layer_error=m["last_layer_error"])


NORM_SCHEMA = dict(PEPITA_SCHEMA, norm=(("sample", "batch"), "sample"))


def _build_norm(s):
    kw = _common(s)
    net = build_pepita_network(tuple(s["model"]["sizes"]), **kw)
    r = net.rule
    rule = NormalizedPEPITA(convention=r.convention, last_layer_error=r.last_layer_error,
                            presynaptic=r.presynaptic, feedback="F", norm=s["model"]["norm"])
    return net.circuit, net.protocol, [rule], "output"


WM_SCHEMA = dict(PEPITA_SCHEMA, convention=(("icml2022", "iclr2024"), "iclr2024"),
                 mirroring=("bool", True), wm_lr=("float0", 0.1), wm_wd=("float0", 0.5),
                 wm_noise=("float+", 0.1), wm_noise_dist=(("rademacher", "gaussian"), "rademacher"),
                 premirror_epochs=("int0", 0), wm_period=("int+", 1))


def _build_wm(s):
    m = s["model"]
    kw = _common(s)
    net, rules = build_pepita_wm_network(
        tuple(m["sizes"]), mirroring=m["mirroring"], wm_lr=m["wm_lr"], wm_wd=m["wm_wd"],
        wm_noise=m["wm_noise"], wm_noise_dist=m["wm_noise_dist"],
        premirror_epochs=m["premirror_epochs"], wm_period=m["wm_period"], **kw)
    return net.circuit, net.protocol, rules, "output"


def _build_tl(s):
    kw = _common(s)
    net = build_pepita_network(tuple(s["model"]["sizes"]), **kw)
    tr = s["training"]
    opt = SGD(lr=tr["lr"], momentum=tr["momentum"], weight_decay=tr["weight_decay"],
              style=tr["optimizer"], milestones=tuple(tr["milestones"]), gamma=tr["gamma"],
              max_weight=tr["max_weight"], schedule=tr["schedule"], epochs=tr["epochs"],
              decay_start=tr["decay_start"])
    # the update is kept (which costs the fused step) only where a monitor compares it with BP
    record = any(m["target"].startswith("grad_angle:") for m in s.get("monitor", ()))
    rule = PEPITATimeLocal(convention=net.rule.convention, feedback="F", optimizer=opt,
                           record_update=record)
    return net.circuit, net.protocol, [rule], "output"


def _build_hebbian(s):
    net = build_pepita_network(tuple(s["model"]["sizes"]), **_common(s))
    return net.circuit, net.protocol, [PepitaHebbian()], "output"


def _register():
    from neurosim.scenario import register_model

    register_model("pepita_norm", NORM_SCHEMA, _build_norm)
    register_model("pepita_wm", WM_SCHEMA, _build_wm)
    register_model("pepita_tl", PEPITA_SCHEMA, _build_tl)
    register_model("pepita_hebbian", PEPITA_SCHEMA, _build_hebbian)


_register()

__all__ = ["build_pepita_wm_network", "wm_factor_std", "PepitaNetwork"]
