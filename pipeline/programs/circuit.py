"""A layered ReLU circuit builder: units ``ReLU(w . h_prev + b)`` placed in numbered layers, with values from
earlier layers carried forward by pass-through units ``ReLU(h) = h`` (every unit is >= 0, so this is exact).

The result is a plain MLP: ``h_l = ReLU(W_l h_{l-1} + b_l)`` for l = 1..L and a linear readout
``y = W_out h_L + b_out``. Weights are kept sparse (COO) and materialized dense on request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["Circuit", "LayeredNet", "Lin"]


class Lin:
    """A linear expression ``sum coeff * unit + const`` over circuit units; a unit is ``(layer, index)``."""

    __slots__ = ("const", "terms")

    def __init__(self, terms: Mapping[tuple[int, int], float] | None = None, const: float = 0.0) -> None:
        self.terms: dict[tuple[int, int], float] = dict(terms or {})
        self.const = float(const)

    def __add__(self, other: Lin | float) -> Lin:
        if not isinstance(other, Lin):
            return Lin(self.terms, self.const + other)
        t = dict(self.terms)
        for k, v in other.terms.items():
            t[k] = t.get(k, 0.0) + v
        return Lin({k: v for k, v in t.items() if v != 0.0}, self.const + other.const)

    __radd__ = __add__

    def __mul__(self, s: float) -> Lin:
        return Lin({k: v * s for k, v in self.terms.items()} if s else {}, self.const * s)

    __rmul__ = __mul__

    def __neg__(self) -> Lin:
        return self * -1.0

    def __sub__(self, other: Lin | float) -> Lin:
        return self + (-other)

    def __rsub__(self, other: float) -> Lin:
        return (-self) + other

    @property
    def layer(self) -> int:
        """The deepest layer this expression reads (0 for constants and inputs)."""
        return max((k[0] for k in self.terms), default=0)


def lsum(items: Iterable[Lin | float]) -> Lin:
    out = Lin()
    for x in items:
        out = out + x
    return out


@dataclass(frozen=True)
class LayeredNet:
    """A looped ReLU-MLP's weights.

    Attributes:
        weights: per hidden layer l (1..L), COO ``(rows, cols, vals)`` of ``W_l`` with shape ``(width_l, width_{l-1})``.
        biases: per hidden layer, ``(width_l,)`` float64.
        readout: COO of ``W_out``, shape ``(width_0, width_L)``; ``readout_bias`` ``(width_0,)``.
        widths: ``[width_0 (the state), width_1, ..., width_L]``.
        activation_bounds: per hidden layer, a proven upper bound of each unit on valid states (the builder's
            units are bits by construction, so 1.0), or None to rely on interval bounds alone.
    """

    weights: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]
    biases: tuple[np.ndarray, ...]
    readout: tuple[np.ndarray, np.ndarray, np.ndarray]
    readout_bias: np.ndarray
    widths: tuple[int, ...]
    activation_bounds: tuple[np.ndarray, ...] | None = None

    @property
    def depth(self) -> int:
        """Hidden ReLU layers per step (the linear readout is not counted)."""
        return len(self.weights)

    def shapes(self) -> list[tuple[int, int]]:
        """(out, in) of every matrix, hidden layers then the readout."""
        w = self.widths
        return [(w[i + 1], w[i]) for i in range(self.depth)] + [(w[0], w[-1])]

    def coo(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return list(self.weights) + [self.readout]

    def all_biases(self) -> list[np.ndarray]:
        return list(self.biases) + [self.readout_bias]

    def dense(self, dtype: type = np.float64) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(W (out, in), b (out,))]`` for every layer including the readout."""
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for (r, c, v), b, shp in zip(self.coo(), self.all_biases(), self.shapes()):
            W: np.ndarray = np.zeros(shp, dtype=dtype)
            np.add.at(W, (r, c), v)
            out.append((W, b.astype(dtype)))
        return out

    def stats(self) -> dict[str, object]:
        """Depth, widths, weight count (dense), nonzeros and sparsity (fraction of zero weights)."""
        dense = sum(o * i for o, i in self.shapes())
        nnz = sum(len(v) for _, _, v in self.coo())
        return {
            "depth": self.depth,
            "widths": list(self.widths),
            "max_width": max(self.widths),
            "weights": dense,
            "nonzeros": nnz,
            "sparsity": 1.0 - nnz / dense if dense else 0.0,
        }

    @cached_property
    def _csr(self) -> list:
        import scipy.sparse as sp

        return [sp.csr_matrix((v, (r, c)), shape=shp) for (r, c, v), shp in zip(self.coo(), self.shapes())]

    def step(self, state: np.ndarray) -> np.ndarray:
        """One loop iteration in float64 (the oracle of the exported graphs). ``state``: (B, width_0)."""
        h = np.asarray(state, dtype=np.float64)
        mats = self._csr
        for W, b in zip(mats[:-1], self.biases):
            h = np.maximum((W @ h.T).T + b, 0.0)
        return (mats[-1] @ h.T).T + self.readout_bias


class Circuit:
    """Builds a :class:`LayeredNet`. Layer 0 holds the ``n_inputs`` state values."""

    def __init__(self, n_inputs: int) -> None:
        self.n_inputs = n_inputs
        self.layers: list[list[tuple[dict[int, float], float]]] = [[({}, 0.0)] * n_inputs]
        self._carry: dict[tuple[int, int, int], int] = {}  # (layer, index, target layer) -> index there

    def input(self, i: int) -> Lin:
        return Lin({(0, i): 1.0})

    def _ensure(self, layer: int) -> None:
        while len(self.layers) <= layer:
            self.layers.append([])

    def _at(self, unit: tuple[int, int], layer: int) -> int:
        """Index of ``unit``'s value in ``layer`` (carrying it through pass-through units)."""
        l, i = unit
        if l == layer:
            return i
        key = (l, i, layer)
        if key not in self._carry:
            prev = self._at(unit, layer - 1)
            self._ensure(layer)
            self.layers[layer].append(({prev: 1.0}, 0.0))
            self._carry[key] = len(self.layers[layer]) - 1
        return self._carry[key]

    def relu(self, lin: Lin, at: int | None = None) -> Lin:
        """A new unit ``ReLU(lin)`` in layer ``at`` (default: the layer after the deepest input of ``lin``)."""
        need = max(lin.layer + 1, 1)
        layer = need if at is None else at
        if layer < need:
            raise ValueError(f"unit reads layer {lin.layer}, cannot be placed in layer {layer}")
        terms: dict[int, float] = {}
        for unit, w in lin.terms.items():
            j = self._at(unit, layer - 1)
            terms[j] = terms.get(j, 0.0) + w
        self._ensure(layer)
        self.layers[layer].append((terms, lin.const))
        return Lin({(layer, len(self.layers[layer]) - 1): 1.0})

    def net(self, outputs: Sequence[Lin], depth: int | None = None) -> LayeredNet:
        """Close the circuit: the readout maps the last layer to ``outputs`` (one per state value, linearly)."""
        if len(outputs) != self.n_inputs:
            raise ValueError(f"{len(outputs)} outputs for a state of {self.n_inputs}")
        L = depth if depth is not None else max(max(o.layer for o in outputs), len(self.layers) - 1, 1)
        if len(self.layers) - 1 > L:
            raise ValueError(f"the circuit uses {len(self.layers) - 1} layers, more than depth {L}")
        rows, cols, vals, rbias = [], [], [], np.zeros(self.n_inputs)
        for o_idx, o in enumerate(outputs):
            rbias[o_idx] = o.const
            for unit, w in o.terms.items():
                rows.append(o_idx)
                cols.append(self._at(unit, L))
                vals.append(w)
        self._ensure(L)
        weights, biases = [], []
        for l in range(1, L + 1):
            r, c, v = [], [], []
            b = np.zeros(len(self.layers[l]))
            for i, (terms, const) in enumerate(self.layers[l]):
                b[i] = const
                for j, w in terms.items():
                    if w != 0.0:
                        r.append(i)
                        c.append(j)
                        v.append(w)
            weights.append((np.asarray(r, np.int64), np.asarray(c, np.int64), np.asarray(v, np.float64)))
            biases.append(b)
        widths = tuple(len(layer) for layer in self.layers[: L + 1])
        if min(widths[1:]) == 0:
            raise ValueError(f"a hidden layer has no units: widths {widths}")
        readout = (np.asarray(rows, np.int64), np.asarray(cols, np.int64), np.asarray(vals, np.float64))
        # every unit the constructions build is a bit on valid states (select, AND, carry-lookahead terms,
        # pass-through of bits, the mux halves): the declared bound is 1 (checked by the interpreter parity tests)
        bounds = tuple(np.ones(w) for w in widths[1:])
        return LayeredNet(tuple(weights), tuple(biases), readout, rbias, widths, bounds)
