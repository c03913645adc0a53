"""Reference baselines for PEPITA training throughput.

Two plain implementations of PEPITA (Dellaferrera & Kreiman, ICML 2022) that the engine's
throughput is compared against:

* :class:`NumpyPEPITA` -- idiomatic, vectorised-per-minibatch numpy, float32;
* :class:`TorchPEPITA` -- the same algorithm in PyTorch on the CPU (``torch.no_grad``, float32,
  in-place ops where a competent torch user would write them). torch is imported lazily: the
  class exists without torch, instantiating it raises an ImportError that says what to install.

Algorithm (one minibatch of B samples, network ``sizes = (784, 1024, 10)``, no biases, hidden
ReLU, output softmax, ``t`` one-hot). For every hidden layer a dropout mask
``m ~ Bernoulli(1 - p) / (1 - p)`` is drawn once and used in both passes:

1. clean pass      ``h0 = x``, ``h_l = relu(h_{l-1} W_l^T) * m_l``, ``hL = softmax(h_{L-1} W_L^T)``,
                   ``e = hL - t``;
2. modulated pass  ``x~ = x + s * e F^T`` (``F`` is ``d_in x n_out``, fixed), same layers with the
                   same masks, ``e~ = hL~ - t``;
3. updates         ``dW_l = (h_l - h_l~)^T h_{l-1}~`` for hidden layers,
                   ``dW_L = e~^T h_{L-1}~`` (convention ``"icml2022"``) or ``e^T h_{L-1}~``
                   (``"iclr2024"``);
4. SGD momentum    ``V <- momentum * V + eta * dW / B``;  ``W <- W - V``.

Initialisation: ``W_l ~ U(+-sqrt(6 / fan_in))`` (He uniform); ``F ~ U(+-f_scale * sqrt(6 / d_in))``.
Both classes build their initial parameters with the same numpy code, so equal ``seed`` means
equal initial weights; :meth:`get_params` / :meth:`set_params` share them explicitly, and
``train_step(..., masks=...)`` injects dropout masks (used by ``tests/test_baselines.py``).

Standalone::

    python benchmarks/baselines.py --threads 1 --n 6400

prints training throughput (samples/s) of both baselines on random data.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np

__all__ = ["NumpyPEPITA", "TorchPEPITA", "set_threads", "init_params", "torch_available"]

_CONVENTIONS = ("icml2022", "iclr2024")

# threadpoolctl limiter kept alive so the limit set by set_threads() stays in force.
_THREAD_LIMITER = None


def torch_available() -> bool:
    """Whether PyTorch can be imported (checked without importing it)."""
    return importlib.util.find_spec("torch") is not None


def _require_torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "TorchPEPITA needs PyTorch, which is not installed. Install the CPU build with "
            "`pip install torch==2.13.0` (other versions pull multi-GB CUDA wheels)."
        ) from exc
    return torch


def set_threads(n: int) -> None:
    """Limit BLAS/OpenMP threads of numpy/scipy (via threadpoolctl) and of torch, if installed.

    The limit stays in force for the rest of the process (until the next call).
    """
    global _THREAD_LIMITER
    n = int(n)
    if n < 1:
        raise ValueError(f"set_threads: n={n}; expected a positive integer")
    from threadpoolctl import threadpool_limits

    if torch_available():
        torch = _require_torch()  # load first: torch ships its own OpenMP runtime
        torch.set_num_threads(n)
    if _THREAD_LIMITER is not None:
        _THREAD_LIMITER.restore_original_limits()
    _THREAD_LIMITER = threadpool_limits(limits=n)


def _check_common(sizes, dropout, sign, convention):
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes={sizes}; expected at least two positive layer sizes")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout}; expected 0 <= dropout < 1")
    if sign not in (1, -1):
        raise ValueError(f"sign={sign}; expected +1 or -1")
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention={convention!r}; expected one of {_CONVENTIONS}")
    return sizes


def init_params(sizes=(784, 1024, 10), seed=0, f_scale=0.05, dtype=np.float32):
    """Initial PEPITA parameters as numpy arrays: ``(weights, F)``.

    ``weights[l]`` has shape ``(sizes[l+1], sizes[l])`` (out x in), He-uniform
    ``U(+-sqrt(6/fan_in))``; ``F`` has shape ``(sizes[0], sizes[-1])``,
    ``U(+-f_scale*sqrt(6/sizes[0]))``. Drawn in float64 and cast, so the values do not depend
    on ``dtype`` beyond rounding.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0]))
    weights = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        lim = np.sqrt(6.0 / fan_in)
        weights.append(rng.uniform(-lim, lim, size=(fan_out, fan_in)).astype(dtype))
    lim_f = f_scale * np.sqrt(6.0 / sizes[0])
    F = rng.uniform(-lim_f, lim_f, size=(sizes[0], sizes[-1])).astype(dtype)
    return weights, F


def _train_seed(seed):
    """Seed of the default training stream (shuffling, dropout), distinct from the init stream."""
    return np.random.SeedSequence([int(seed), 1])


# --------------------------------------------------------------------------------------------
# numpy
# --------------------------------------------------------------------------------------------


class NumpyPEPITA:
    """PEPITA in plain numpy, vectorised per minibatch.

    Parameters
    ----------
    sizes : layer widths, input first (default 784-1024-10).
    seed : seed of the initial weights and of the default training random stream.
    eta, momentum : SGD-with-momentum learning rate and momentum.
    dropout : dropout probability on hidden layers (mask shared by both passes).
    f_scale : F ~ U(+-f_scale * sqrt(6 / d_in)).
    sign : +1 or -1, sign of the input modulation ``x~ = x + sign * e F^T``.
    dtype : float dtype of all arrays (float32 for the benchmarks).
    convention : ``"icml2022"`` (last layer uses ``e~``) or ``"iclr2024"`` (uses ``e``).
    """

    def __init__(self, sizes=(784, 1024, 10), seed=0, eta=0.1, momentum=0.9, dropout=0.1,
                 f_scale=0.05, sign=+1, dtype=np.float32, convention="icml2022"):
        self.sizes = _check_common(sizes, dropout, sign, convention)
        self.eta = float(eta)
        self.momentum = float(momentum)
        self.dropout = float(dropout)
        self.sign = int(sign)
        self.dtype = np.dtype(dtype)
        self.convention = convention
        self.W, self.F = init_params(self.sizes, seed, f_scale, self.dtype)
        self.V = [np.zeros_like(w) for w in self.W]
        self.rng = np.random.default_rng(_train_seed(seed))

    # -- parameters -------------------------------------------------------------------------
    def get_params(self):
        """Copies of ``{"W": [...], "V": [...], "F": F}`` as numpy arrays."""
        return {"W": [w.copy() for w in self.W], "V": [v.copy() for v in self.V],
                "F": self.F.copy()}

    def set_params(self, params):
        """Load ``{"W": [...], "F": F}`` (and optionally ``"V"``) from :meth:`get_params`."""
        self.W = [np.array(w, dtype=self.dtype) for w in params["W"]]
        self.F = np.array(params["F"], dtype=self.dtype)
        if params.get("V") is not None:
            self.V = [np.array(v, dtype=self.dtype) for v in params["V"]]
        else:
            self.V = [np.zeros_like(w) for w in self.W]

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z

    def _onehot(self, y):
        y = np.asarray(y)
        if y.ndim == 2:
            return y.astype(self.dtype, copy=False)
        return np.eye(self.sizes[-1], dtype=self.dtype)[y]

    def sample_masks(self, batch, rng=None):
        """Dropout masks for one minibatch: one ``(batch, n_l)`` array per hidden layer."""
        if self.dropout == 0.0:
            return None
        rng = self.rng if rng is None else rng
        keep = 1.0 - self.dropout
        return [(rng.random((batch, n), dtype=self.dtype) < keep).astype(self.dtype) / keep
                for n in self.sizes[1:-1]]

    def _forward(self, x, masks):
        hs = [x]
        h = x
        for l, w in enumerate(self.W[:-1]):
            h = h @ w.T
            np.maximum(h, 0, out=h)
            if masks is not None:
                h *= masks[l]
            hs.append(h)
        hs.append(self._softmax(h @ self.W[-1].T))
        return hs

    def predict(self, x):
        """Class scores (softmax output) without dropout."""
        return self._forward(np.asarray(x, dtype=self.dtype), None)[-1]

    # -- training ---------------------------------------------------------------------------
    def train_step(self, x, t, masks=None, rng=None):
        """One PEPITA update on a minibatch.

        ``t`` is integer labels or one-hot targets. ``masks`` (one array per hidden layer,
        already scaled by ``1/(1-dropout)``) overrides the dropout masks drawn from ``rng``.
        """
        x = np.asarray(x, dtype=self.dtype)
        t = self._onehot(t)
        B = x.shape[0]
        if masks is None:
            masks = self.sample_masks(B, rng)
        else:
            masks = [np.asarray(m, dtype=self.dtype) for m in masks]

        # 1. clean pass
        hs = self._forward(x, masks)
        e = hs[-1] - t
        # 2. modulated pass
        x_mod = x + self.sign * (e @ self.F.T)
        hs_mod = self._forward(x_mod, masks)
        e_mod = hs_mod[-1] - t
        # 3. weight changes, 4. SGD with momentum
        L = len(self.W)
        for l in range(L):
            if l < L - 1:
                dW = (hs[l + 1] - hs_mod[l + 1]).T @ hs_mod[l]
            else:
                err = e_mod if self.convention == "icml2022" else e
                dW = err.T @ hs_mod[l]
            self.V[l] *= self.momentum
            self.V[l] += (self.eta / B) * dW
            self.W[l] -= self.V[l]

    def train_epoch(self, x, y, batch_size=64, rng=None, shuffle=True):
        """One pass over ``(x, y)`` in minibatches; ``rng`` (numpy Generator) drives shuffling
        and dropout (default: the model's own stream). A last partial batch is used as is."""
        rng = self.rng if rng is None else rng
        x = np.asarray(x, dtype=self.dtype)
        T = self._onehot(y)
        n = x.shape[0]
        order = rng.permutation(n) if shuffle else np.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            self.train_step(x[idx], T[idx], rng=rng)


# --------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------


class TorchPEPITA:
    """PEPITA in PyTorch on the CPU; same parameters and semantics as :class:`NumpyPEPITA`.

    Weights are initialised with the same numpy code (equal ``seed`` -> equal initial weights).
    Random numbers during training come from a ``torch.Generator``; ``train_epoch``'s ``rng``
    may be a ``torch.Generator``, an int seed, or a numpy Generator (a seed is drawn from it).
    Raises ImportError if torch is not installed.
    """

    def __init__(self, sizes=(784, 1024, 10), seed=0, eta=0.1, momentum=0.9, dropout=0.1,
                 f_scale=0.05, sign=+1, dtype=np.float32, convention="icml2022"):
        torch = _require_torch()
        self._torch = torch
        self.sizes = _check_common(sizes, dropout, sign, convention)
        self.eta = float(eta)
        self.momentum = float(momentum)
        self.dropout = float(dropout)
        self.sign = int(sign)
        self.np_dtype = np.dtype(dtype)
        self.dtype = {np.dtype(np.float32): torch.float32,
                      np.dtype(np.float64): torch.float64}[self.np_dtype]
        self.convention = convention
        W, F = init_params(self.sizes, seed, f_scale, self.np_dtype)
        self.W = [torch.from_numpy(w) for w in W]
        self.F = torch.from_numpy(F)
        self.V = [torch.zeros_like(w) for w in self.W]
        self.gen = torch.Generator().manual_seed(
            int(_train_seed(seed).generate_state(1, np.uint64)[0] >> np.uint64(1)))

    # -- parameters -------------------------------------------------------------------------
    def get_params(self):
        """Copies of ``{"W": [...], "V": [...], "F": F}`` as numpy arrays."""
        return {"W": [w.numpy().copy() for w in self.W], "V": [v.numpy().copy() for v in self.V],
                "F": self.F.numpy().copy()}

    def set_params(self, params):
        """Load ``{"W": [...], "F": F}`` (and optionally ``"V"``), numpy arrays or tensors."""
        torch = self._torch
        self.W = [torch.tensor(np.asarray(w), dtype=self.dtype) for w in params["W"]]
        self.F = torch.tensor(np.asarray(params["F"]), dtype=self.dtype)
        if params.get("V") is not None:
            self.V = [torch.tensor(np.asarray(v), dtype=self.dtype) for v in params["V"]]
        else:
            self.V = [torch.zeros_like(w) for w in self.W]

    # -- helpers ----------------------------------------------------------------------------
    def _generator(self, rng):
        torch = self._torch
        if rng is None:
            return self.gen
        if isinstance(rng, torch.Generator):
            return rng
        if isinstance(rng, np.random.Generator):
            rng = int(rng.integers(2**62))
        return torch.Generator().manual_seed(int(rng))

    def _as_tensor(self, a):
        torch = self._torch
        if isinstance(a, torch.Tensor):
            return a.to(self.dtype)
        return torch.from_numpy(np.ascontiguousarray(a, dtype=self.np_dtype))

    def _onehot(self, y):
        torch = self._torch
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
        if y.ndim == 2:
            return y.to(self.dtype)
        return torch.nn.functional.one_hot(y.long(), self.sizes[-1]).to(self.dtype)

    def sample_masks(self, batch, gen=None):
        """Dropout masks for one minibatch: one ``(batch, n_l)`` tensor per hidden layer."""
        if self.dropout == 0.0:
            return None
        gen = self.gen if gen is None else gen
        keep = 1.0 - self.dropout
        return [self._torch.empty(batch, n, dtype=self.dtype).bernoulli_(keep, generator=gen)
                .div_(keep) for n in self.sizes[1:-1]]

    def _forward(self, x, masks):
        torch = self._torch
        hs = [x]
        h = x
        for l, w in enumerate(self.W[:-1]):
            h = torch.relu_(h @ w.T)
            if masks is not None:
                h.mul_(masks[l])
            hs.append(h)
        hs.append(torch.softmax(h @ self.W[-1].T, dim=1))
        return hs

    def predict(self, x):
        """Class scores (softmax output) without dropout, as a numpy array."""
        with self._torch.no_grad():
            return self._forward(self._as_tensor(x), None)[-1].numpy()

    # -- training ---------------------------------------------------------------------------
    def _step(self, x, t, masks):
        B = x.shape[0]
        # 1. clean pass
        hs = self._forward(x, masks)
        e = hs[-1].sub_(t)
        # 2. modulated pass
        x_mod = self._torch.addmm(x, e, self.F.T, alpha=float(self.sign))  # x + s e F^T
        hs_mod = self._forward(x_mod, masks)
        e_mod = hs_mod[-1].sub_(t)
        # 3. weight changes, 4. SGD with momentum
        L = len(self.W)
        for l in range(L):
            if l < L - 1:
                dW = hs[l + 1].sub_(hs_mod[l + 1]).T @ hs_mod[l]
            else:
                err = e_mod if self.convention == "icml2022" else e
                dW = err.T @ hs_mod[l]
            self.V[l].mul_(self.momentum).add_(dW, alpha=self.eta / B)
            self.W[l].sub_(self.V[l])

    def train_step(self, x, t, masks=None, rng=None):
        """One PEPITA update; ``x``/``t``/``masks`` may be numpy arrays or tensors
        (``t``: labels or one-hot; ``masks`` already scaled by ``1/(1-dropout)``)."""
        torch = self._torch
        with torch.no_grad():
            x = self._as_tensor(x)
            t = self._onehot(t)
            if masks is None:
                masks = self.sample_masks(x.shape[0], self._generator(rng))
            else:
                masks = [self._as_tensor(m) for m in masks]
            self._step(x, t, masks)

    def train_epoch(self, x, y, batch_size=64, rng=None, shuffle=True):
        """One pass over ``(x, y)`` in minibatches (see :meth:`NumpyPEPITA.train_epoch`)."""
        torch = self._torch
        gen = self._generator(rng)
        with torch.no_grad():
            X = self._as_tensor(x)
            T = self._onehot(y)
            n = X.shape[0]
            order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                xb = X[idx]
                self._step(xb, T[idx], self.sample_masks(xb.shape[0], gen))


# --------------------------------------------------------------------------------------------
# standalone benchmark
# --------------------------------------------------------------------------------------------


def _bench(model, x, y, batch_size, repeats, seed):
    """Best-of-``repeats`` samples/s of ``model.train_epoch`` (after one warm-up batch)."""
    model.train_epoch(x[:batch_size], y[:batch_size], batch_size=batch_size)
    best = float("inf")
    for r in range(repeats):
        rng = np.random.default_rng(seed + r)
        t0 = time.perf_counter()
        model.train_epoch(x, y, batch_size=batch_size, rng=rng)
        best = min(best, time.perf_counter() - t0)
    return x.shape[0] / best


def main(argv=None):
    p = argparse.ArgumentParser(description="Throughput of the numpy/torch PEPITA baselines.")
    p.add_argument("--threads", type=int, default=1, help="BLAS / torch threads (default 1)")
    p.add_argument("--n", type=int, default=6400, help="samples per timed epoch (default 6400)")
    p.add_argument("--batch", type=int, default=64, help="minibatch size (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs, best is reported")
    p.add_argument("--sizes", type=str, default="784,1024,10", help="layer sizes (default 784,1024,10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-torch", action="store_true", help="skip the torch baseline")
    args = p.parse_args(argv)

    sizes = tuple(int(s) for s in args.sizes.split(","))
    set_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    x = rng.random((args.n, sizes[0]), dtype=np.float32)
    y = rng.integers(0, sizes[-1], size=args.n)

    print(f"PEPITA baselines: sizes={sizes} batch={args.batch} n={args.n} "
          f"threads={args.threads} repeats={args.repeats} (best of)")
    sps = _bench(NumpyPEPITA(sizes, seed=args.seed), x, y, args.batch, args.repeats, args.seed)
    print(f"numpy  {sps:12.0f} samples/s")
    if args.no_torch:
        return
    if not torch_available():
        print("torch  (not installed; skipped)")
        return
    torch = _require_torch()
    sps = _bench(TorchPEPITA(sizes, seed=args.seed), x, y, args.batch, args.repeats, args.seed)
    print(f"torch  {sps:12.0f} samples/s  (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
