"""The one graph index and the one node builder that exporters/ share for hand-built ONNX graph work.

Pattern rewrites use onnxscript's rewriter (see ``exporters.onnx._gelu_in_fusable_order``); what stays hand-built
is the block-sparse attention subgraph (exporters.block_sparse_graph) and the node-by-node lowering around it
(exporters.attention), which emit nodes through :class:`NodeBuilder`, and the structural queries of the precision
and fusion checks, which read a :class:`GraphIndex`.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["GraphIndex", "NodeBuilder"]


class GraphIndex:
    """Producer/consumer maps and constant knowledge for one ``GraphProto`` (top level; a snapshot: rebuild after
    editing the graph).

    Attributes:
        producer: tensor name -> the node that outputs it.
        consumers: tensor name -> the nodes that read it, in graph order.
        initializers: names of (sparse) initializers.
        graph_inputs: names of graph inputs that are not initializers.
        direct_constants: initializers and ``Constant`` node outputs (constant without any computation).
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers[i].append(node)
        self.initializers = {t.name for t in graph.initializer} | {t.name for t in graph.sparse_initializer}
        self.graph_inputs = {i.name for i in graph.input} - self.initializers
        self.direct_constants = self.initializers | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        self._const: dict[str, bool] = {}

    def is_constant(self, name: str) -> bool:
        """True when ``name`` depends only on initializers / Constant nodes (e.g. a weight, or a weight's Transpose)."""
        if name in self._const:
            return self._const[name]
        stack, order = [name], []
        while stack:  # iterative DFS: exported graphs can be deep
            cur = stack.pop()
            if cur in self._const or cur in order:
                continue
            order.append(cur)
            node = self.producer.get(cur)
            if node is not None:
                stack.extend(i for i in node.input if i)
        for cur in reversed(order):
            if cur in self._const:
                continue
            if cur in self.initializers:
                self._const[cur] = True
            elif cur in self.graph_inputs or cur not in self.producer:
                self._const[cur] = False
            else:
                node = self.producer[cur]
                ins = [i for i in node.input if i]
                self._const[cur] = all(self._const.get(i, False) for i in ins)  # Constant: no inputs -> True
        return self._const[name]


class NodeBuilder:
    """Appends uniquely named nodes under ``prefix``; constants are ``Constant`` nodes (valid in functions too).

    Names: outputs ``{prefix}{hint}_{n}``, nodes ``{prefix}{OpType}_{n}``, with one counter per builder.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self._n = itertools.count()

    def _name(self, hint: str) -> str:
        return f"{self.prefix}{hint}_{next(self._n)}"

    def op(
        self, op_type: str, *inputs: str, out: str | None = None, name: str | None = None, domain: str = "", **attrs
    ) -> str:
        """Append one node with a single output; returns the output name."""
        out = out or self._name(op_type.lower())
        node = helper.make_node(
            op_type, list(inputs), [out], name=name or self._name(op_type), domain=domain or None, **attrs
        )
        self.nodes.append(node)
        return out

    def const(self, value, dtype=np.int64) -> str:
        """A ``Constant`` node holding ``np.asarray(value, dtype)``; returns its output name."""
        arr = np.asarray(value, dtype=dtype)
        out = self._name("const")
        self.nodes.append(
            helper.make_node(
                "Constant", [], [out], name=self._name("Constant"), value=numpy_helper.from_array(arr, out)
            )
        )
        return out

    def i64(self, *vals: int) -> str:
        """1-D int64 constant."""
        return self.const(list(vals))

    def scalar(self, val: int) -> str:
        """0-D int64 constant."""
        return self.const(val)

    def shape_cat(self, *parts: str | int) -> str:
        """Concat 1-D pieces (names of 1-D int64 tensors or python ints) into a shape."""
        names = [self.i64(p) if isinstance(p, int) else p for p in parts]
        return self.op("Concat", *names, axis=0)
