"""Optimized ONNX -> onnxruntime-specific ONNX: attention rewritten into ``com.microsoft.MultiHeadAttention``.

The unmasked attention of the stage graphs (diffusers' SDPA after polygraphy's folding, in the lowering of
either torch exporter) becomes one ``MultiHeadAttention(q, k, v)`` node with its head count and scale, so
onnxruntime runs it without the ``[B, N, S, L]`` score tensor. Only certain matches are rewritten; anything
else is left with a recorded reason. The result goes to ``model.ort.onnx`` beside the backend-neutral
``model.opt.onnx`` (TensorRT cannot parse ``com.microsoft`` ops) and reads the same external data.
The pattern, the conditions of a match and why: docs/export.md, "Attention fusion for onnxruntime".
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from profusion_rt.export.optimize import external_locations

from profusion_rt.core.fsio import file_mode, move_into_place, staging_dir

logger = logging.getLogger(__name__)

#: bump when the rewrite changes: part of the export stage's cache key
PASS_VERSION = "mha-2"
MS_DOMAIN = "com.microsoft"
METADATA_KEY = "ort_fusion"


@dataclass
class FusionResult:
    """What :func:`fuse_attention` did to one graph."""

    #: attention subgraphs rewritten into MultiHeadAttention
    fused: int
    #: Softmax nodes left in the graph (masked attention, or anything that did not match)
    unmatched_softmax: int
    seconds: float
    #: why Softmax nodes were not fused (reason -> count)
    reasons: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        left = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items()))
        return (f"{self.fused} attention -> {MS_DOMAIN}.MultiHeadAttention, {self.unmatched_softmax} softmax left"
                + (f" ({left})" if left else ""))


@dataclass
class OrtModelInfo:
    """What :func:`write_ort_model` wrote."""

    path: Path
    result: FusionResult
    #: files written (empty when nothing was fused: no file then)
    files: list[str]
    seconds: float
    #: external data files of the source that the written model reads (shared, not copied)
    shared_data: list[str] = field(default_factory=list)


class _NoMatch(Exception):
    """One Softmax is not the attention pattern (the message is the reason, counted per graph)."""


# -- graph helpers ---------------------------------------------------------------------------------------
def _attr(node, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _subgraph_names(graph) -> set[str]:
    """Every tensor name read by nodes inside subgraphs (If/Loop/Scan bodies): treated as always used."""
    from onnx import AttributeProto

    names: set[str] = set()

    def subgraphs(n):
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                yield a.g
            elif a.type == AttributeProto.GRAPHS:
                yield from a.graphs

    def visit(g):
        for n in g.node:
            names.update(n.input)
            for sub in subgraphs(n):
                visit(sub)

    for n in graph.node:
        for sub in subgraphs(n):
            visit(sub)
    return names


class _Graph:
    """Producer/consumer indexes and constant lookup over a GraphProto."""

    def __init__(self, graph):
        self.g = graph
        #: the nodes, held once: matching and rewriting identify nodes by ``id()`` of these objects
        self.nodes = list(graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.graph_outputs = {o.name for o in graph.output}
        self.graph_inputs = {i.name for i in graph.input}
        self.pinned = self.graph_outputs | _subgraph_names(graph)
        self.inits = {t.name: t for t in graph.initializer}
        self.value_info = {v.name: v for v in (*graph.value_info, *graph.input, *graph.output)}

    def only_consumer(self, name: str, what: str):
        """The one node reading ``name``; :class:`_NoMatch` when it has several readers or is a graph output."""
        cons = self.consumers.get(name, [])
        if len(cons) != 1 or name in self.pinned:
            raise _NoMatch(f"{what} has other consumers")
        return cons[0]

    def produced_by(self, name: str, op: str, what: str):
        n = self.producer.get(name)
        if n is None or n.op_type != op or n.domain not in ("", "ai.onnx"):
            raise _NoMatch(f"{what} is not a {op}")
        return n

    def const(self, name: str):
        """The value of a constant tensor (inline initializer that is not a graph input, or a Constant
        node), else None. Initializers stored in external data are not read (None)."""
        from onnx import numpy_helper

        t = self.inits.get(name)
        if t is not None:
            if name in self.graph_inputs or t.data_location == 1:
                return None
            return numpy_helper.to_array(t)
        n = self.producer.get(name)
        if n is None or n.op_type != "Constant" or n.domain not in ("", "ai.onnx"):
            return None
        import numpy as np

        for a in n.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name in ("value_float", "value_int"):
                return np.asarray(_attr(n, a.name))
            if a.name in ("value_floats", "value_ints"):
                return np.asarray(list(_attr(n, a.name)))
        return None

    def dims(self, name: str) -> list | None:
        """Shape from shape inference: ints for static dims, strings for symbols, None when unknown; None
        when the rank is unknown."""
        vi = self.value_info.get(name)
        if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            t = self.inits.get(name)
            return None if t is None else [int(d) for d in t.dims]
        out = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                out.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param and not d.dim_param.startswith("unk__"):
                out.append(d.dim_param)
            else:
                out.append(None)
        return out

    def shape_parts(self, name: str, rank: int) -> list | None:
        """The ``rank`` elements of a Reshape target: ints where constant, else the name of the tensor the
        element comes from (a one-element Concat input); None when it cannot be read."""
        value = self.const(name)
        if value is not None:
            flat = value.reshape(-1)
            return [int(v) for v in flat] if flat.size == rank and value.dtype.kind in "iu" else None
        n = self.producer.get(name)
        if n is None or n.op_type != "Concat" or _attr(n, "axis", 0) != 0:
            return None
        parts: list = []
        for i in n.input:
            v = self.const(i)
            if v is not None:
                parts.extend(int(x) for x in v.reshape(-1))
            else:
                d = self.dims(i)
                if d is None or d != [1]:
                    return None  # a part of unknown length
                parts.append(i)
        return parts if len(parts) == rank else None

    def is_batch_read(self, name: str) -> bool:
        """``name`` is ``Unsqueeze(Gather(Shape(t), 0))``: a tensor's batch size read at run time."""
        n = self.producer.get(name)
        if n is None or n.op_type != "Unsqueeze":
            return False
        g = self.producer.get(n.input[0])
        if g is None or g.op_type != "Gather" or _attr(g, "axis", 0) != 0:
            return False
        idx = self.const(g.input[1])
        if idx is None or idx.size != 1 or int(idx.reshape(-1)[0]) != 0:
            return False
        s = self.producer.get(g.input[0])
        return s is not None and s.op_type == "Shape" and _attr(s, "start", 0) == 0


# -- matching --------------------------------------------------------------------------------------------
@dataclass
class _Match:
    nodes: list  # every node of the pattern that goes away (the output Reshape last)
    q: str
    k: str
    v: str
    out: str
    heads: int
    scale: float
    scope: str


@dataclass
class _KeyChain:
    """How the key reaches the scores MatMul as ``[B, N, H, L]`` (docs/export.md, "Attention fusion for onnxruntime")."""

    reshape: Any  # Reshape(k2d, [b, s, N, H]): the key's heads view
    nodes: list  # the nodes between it and the key's scale Mul (they go away)
    #: dynamo only: (t4, merge Reshape, split Reshape) to check once N and H are known; None for legacy
    dynamo: tuple | None = None


def _perm(node) -> list[int] | None:
    p = _attr(node, "perm")
    return None if p is None else [int(x) for x in p]


def _scaled(G: _Graph, mul, what: str) -> tuple[str, float]:
    """(data input, constant factor) of the scale ``Mul`` of the query or key. The data is the input made by
    a Transpose (both lowerings) or a Reshape (the dynamo key), in either operand order."""
    data = next((i for i in mul.input if G.producer.get(i) is not None
                 and G.producer[i].op_type in ("Transpose", "Reshape")), None)
    if data is None:
        raise _NoMatch("query/key are not transposed heads")
    return data, _scalar(G, mul, data, what)


def _scalar(G: _Graph, mul, data: str, what: str) -> float:
    """The constant factor of ``mul`` (the input that is not ``data``)."""
    if len(mul.input) != 2 or data not in mul.input:
        raise _NoMatch(f"{what} scale is not a Mul")
    other = mul.input[1] if mul.input[0] == data else mul.input[0]
    if other == data:
        raise _NoMatch(f"{what} scale is not constant")
    value = G.const(other)
    if value is None or value.size != 1 or value.ndim > 4 or value.dtype.kind != "f":
        raise _NoMatch(f"{what} scale is not a constant scalar")
    scale = float(value.reshape(-1)[0])
    if not math.isfinite(scale) or scale <= 0:
        raise _NoMatch(f"{what} scale is not a positive number")
    return scale


def _static(d) -> bool:
    return isinstance(d, int) and d > 0


def _check_batch(G: _Graph, part, allowzero: int, in_dims: list | None, what: str, fixed_rest: bool) -> None:
    """``part`` of a Reshape target is the batch of its input ``in_dims = [B, ...]``. ``fixed_rest``: the
    caller checked that the target's other parts are constants whose product is the input's other dims (then
    ``-1`` can only be the batch: the dynamo exporter writes ``[-1, S, N, H]`` for a symbolic batch)."""
    if isinstance(part, str):
        if not G.is_batch_read(part):
            raise _NoMatch(f"{what} batch is not read from a shape")
        return
    if part == 0 and not allowzero:
        return
    if part == -1 and fixed_rest:
        return
    if part > 0 and in_dims is not None and in_dims[0] == part:
        return
    raise _NoMatch(f"{what} batch is not the input's")


def _check_seq(part, allowzero: int, in_dims: list | None, what: str) -> None:
    if part == -1 or (part == 0 and not allowzero):
        return
    if _static(part) and in_dims is not None and in_dims[1] == part:
        return
    raise _NoMatch(f"{what} sequence length is not -1")


def _heads_view(G: _Graph, reshape, what: str) -> tuple[str, int, int]:
    """(2-D input name, N, H) of a ``Reshape(x, [b, s, N, H])`` of a 3-D ``x = [B, S, N*H]``."""
    x = reshape.input[0]
    in_dims = G.dims(x)
    if in_dims is None or len(in_dims) != 3:
        raise _NoMatch(f"{what} input is not known to be 3-D")
    parts = G.shape_parts(reshape.input[1], 4)
    if parts is None:
        raise _NoMatch(f"{what} reshape target is not known")
    allowzero = int(_attr(reshape, "allowzero", 0))
    _check_seq(parts[1], allowzero, in_dims, what)
    n, h = parts[2], parts[3]
    width = in_dims[2] if isinstance(in_dims[2], int) else None
    if not isinstance(h, int) or h <= 0:
        raise _NoMatch(f"{what} head size is not constant")
    if n == -1 and width is not None and width % h == 0 and parts[0] != -1:
        n = width // h
    if not isinstance(n, int) or n <= 0:
        raise _NoMatch(f"{what} head count is not known")
    if width is not None and n * h != width:
        raise _NoMatch(f"{what} heads x head size is not the projection width")
    fixed_rest = _static(parts[1]) and width is not None  # [-1, S, N, H] of [B, S, N*H]: -1 is B
    _check_batch(G, parts[0], allowzero, in_dims, what, fixed_rest)
    return x, n, h


def _transposed_heads(G: _Graph, name: str, what: str):
    """The ``Transpose(perm 0,2,1,3)`` of a heads view that makes ``name`` (read by one node only)."""
    t = G.produced_by(name, "Transpose", what)
    if _perm(t) != [0, 2, 1, 3]:
        raise _NoMatch("head transposes have other perms")
    G.only_consumer(name, what)
    return t


def _key_chain(G: _Graph, data: str) -> _KeyChain:
    """The nodes that turn the key's heads view ``[B, L, N, H]`` into the scores MatMul's ``[B, N, H, L]``:
    one ``Transpose(perm 0,2,3,1)`` (legacy), or (dynamo) ``Transpose(0,2,1,3) -> Reshape [B*N, L, H] ->
    Transpose(0,2,1) -> Reshape [B, N, H, L]``, whose last target is a constant or ``Concat(shape(t4)[:2],
    H, L)`` with ``t4`` the first Transpose's output. The Reshape targets are checked by
    :func:`_check_dynamo_key` once N and H are known."""
    G.only_consumer(data, "key heads")
    last = G.producer[data]
    if last.op_type == "Transpose":  # legacy
        if _perm(last) != [0, 2, 3, 1]:
            raise _NoMatch("head transposes have other perms")
        return _KeyChain(G.produced_by(last.input[0], "Reshape", "key heads"), [last])
    split = G.produced_by(data, "Reshape", "key heads")  # dynamo: -> [B, N, H, L]
    t3 = G.produced_by(split.input[0], "Transpose", "key split input")
    merge = G.produced_by(t3.input[0], "Reshape", "key transpose input")
    t4 = G.produced_by(merge.input[0], "Transpose", "key merge input")
    if _perm(t4) != [0, 2, 1, 3] or _perm(t3) != [0, 2, 1]:
        raise _NoMatch("head transposes have other perms")
    G.only_consumer(t3.output[0], "transposed key")
    G.only_consumer(merge.output[0], "merged key")
    nodes = [t4, merge, t3]
    # t4's readers: the merge Reshape and, for a symbolic batch, a Shape -> Slice -> Concat that feeds only
    # the split Reshape's target (what they compute is checked by _check_dynamo_key)
    shape_reads = [n for n in G.consumers.get(t4.output[0], []) if n is not merge]
    if t4.output[0] in G.pinned or len(shape_reads) > 1 or any(n.op_type != "Shape" for n in shape_reads):
        raise _NoMatch("key heads have other consumers")
    for shape in shape_reads:
        sl = G.only_consumer(shape.output[0], "key shape")
        cat = G.only_consumer(sl.output[0], "key shape slice")
        if G.only_consumer(cat.output[0], "key split target") is not split or split.input[1] != cat.output[0]:
            raise _NoMatch("key shape does not feed the split target")
        nodes += [shape, sl, cat]
    nodes.append(split)
    return _KeyChain(G.produced_by(t4.input[0], "Reshape", "key heads"), nodes, (t4, merge, split))


def _leading_dims_of(G: _Graph, name: str, t4: str) -> bool:
    """``name`` is ``Slice(Shape(t4), 0, -2)`` (or ``[:2]``): the ``[B, N]`` of the 4-D ``t4``."""
    sl = G.producer.get(name)
    if sl is None or sl.op_type != "Slice" or not 3 <= len(sl.input) <= 5:
        return False
    shape = G.producer.get(sl.input[0])
    if shape is None or shape.op_type != "Shape" or shape.input[0] != t4 or _attr(shape, "start", 0) != 0 \
            or _attr(shape, "end") is not None:
        return False
    values = [G.const(i) if i else None for i in sl.input[1:]]
    if any(v is None or v.size != 1 or v.dtype.kind not in "iu" for v in values[:2]) \
            or any(i and (v is None or v.size != 1) for i, v in zip(sl.input[3:], values[2:])):
        return False
    start, end = int(values[0].reshape(-1)[0]), int(values[1].reshape(-1)[0])
    axis = int(values[2].reshape(-1)[0]) if len(values) > 2 and values[2] is not None else 0
    step = int(values[3].reshape(-1)[0]) if len(values) > 3 and values[3] is not None else 1
    return axis in (0, -1) and step == 1 and (start == 0 or start <= -4) and end in (2, -2)


def _check_dynamo_key(G: _Graph, chain: _KeyChain, n: int, h: int) -> None:
    """The dynamo key chain's Reshapes are exactly ``[B, N, L, H] -> [B*N, L, H]`` and ``[B*N, H, L] ->
    [B, N, H, L]`` for the key's N and H and its static length L."""
    t4, merge, split = chain.dynamo
    k_dims = G.dims(chain.reshape.input[0])
    seq = k_dims[1] if k_dims is not None and len(k_dims) == 3 else None
    if not _static(seq):
        raise _NoMatch("key length is not static")
    batch = k_dims[0] if _static(k_dims[0]) else None
    parts = G.shape_parts(merge.input[1], 3)
    if parts is None or parts[1:] != [seq, h] or not (parts[0] == -1 or (batch and parts[0] == batch * n)):
        raise _NoMatch("key merge reshape is not [B*N, L, H]")
    target = split.input[1]
    parts = G.shape_parts(target, 4)
    if parts is not None:  # a constant target: [b, N, H, L]
        if parts[1:] != [n, h, seq] or not (parts[0] == -1 or (batch and parts[0] == batch)):
            raise _NoMatch("key split reshape is not [B, N, H, L]")
        return
    cat = G.producer.get(target)  # Concat(shape(t4)[:2], constants)
    if cat is None or cat.op_type != "Concat" or _attr(cat, "axis", 0) != 0 or len(cat.input) < 2 \
            or not _leading_dims_of(G, cat.input[0], t4.output[0]):
        raise _NoMatch("key split reshape target is not known")
    rest = [G.const(i) for i in cat.input[1:]]
    if any(v is None or v.dtype.kind not in "iu" for v in rest):
        raise _NoMatch("key split reshape target is not known")
    if [int(x) for v in rest for x in v.reshape(-1)] != [h, seq]:
        raise _NoMatch("key split reshape is not [B, N, H, L]")


def _match(G: _Graph, sm, default_axis: int) -> _Match:
    axis = int(_attr(sm, "axis", default_axis))
    if axis not in (-1, 3):
        raise _NoMatch("softmax is not over the last axis")
    scores = G.producer.get(sm.input[0])
    if scores is not None and scores.op_type in ("Add", "Where", "Sub"):
        raise _NoMatch("masked")
    mm1 = G.produced_by(sm.input[0], "MatMul", "softmax input")
    G.only_consumer(mm1.output[0], "scores")
    mm2 = G.only_consumer(sm.output[0], "softmax output")
    if mm2.op_type != "MatMul" or mm2.input[0] != sm.output[0]:
        raise _NoMatch("softmax output does not feed a MatMul")

    mq = G.produced_by(mm1.input[0], "Mul", "query")
    mk = G.produced_by(mm1.input[1], "Mul", "key")
    G.only_consumer(mq.output[0], "scaled query")
    G.only_consumer(mk.output[0], "scaled key")
    q_data, sq = _scaled(G, mq, "query")
    k_data, sk = _scaled(G, mk, "key")
    tq = _transposed_heads(G, q_data, "query heads")
    key = _key_chain(G, k_data)
    tv = _transposed_heads(G, mm2.input[1], "value heads")
    rq = G.produced_by(tq.input[0], "Reshape", "query heads")
    rv = G.produced_by(tv.input[0], "Reshape", "value heads")

    to = G.only_consumer(mm2.output[0], "attention output")
    if to.op_type != "Transpose" or _perm(to) != [0, 2, 1, 3]:
        raise _NoMatch("attention output is not transposed back")
    ro = G.only_consumer(to.output[0], "transposed output")
    if ro.op_type != "Reshape" or ro.input[0] != to.output[0]:
        raise _NoMatch("attention output is not merged by a Reshape")

    q, n_q, h_q = _heads_view(G, rq, "query")
    k, n_k, h_k = _heads_view(G, key.reshape, "key")
    v, n_v, h_v = _heads_view(G, rv, "value")
    if not n_q == n_k == n_v or h_q != h_k:
        raise _NoMatch("query, key and value heads differ")
    if key.dynamo is not None:
        _check_dynamo_key(G, key, n_k, h_k)
    parts = G.shape_parts(ro.input[1], 3)
    if parts is None or parts[2] != n_q * h_v:
        raise _NoMatch("output reshape is not [B, S, N*H]")
    allowzero = int(_attr(ro, "allowzero", 0))
    q_dims = G.dims(q)
    _check_seq(parts[1], allowzero, q_dims, "output")
    _check_batch(G, parts[0], allowzero, q_dims, "output", _static(parts[1]))  # [-1, S, N*H]: -1 is B

    scope = sm.name.rsplit("/", 1)[0] if "/" in sm.name else sm.name
    return _Match([sm, mm1, mm2, mq, mk, tq, *key.nodes, tv, to, ro], q, k, v, ro.output[0], n_q, sq * sk, scope)


# -- rewriting -------------------------------------------------------------------------------------------
def _opset(model, domain: str = "") -> int:
    for o in model.opset_import:
        if o.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(o.version)
    return 0


def fuse_attention(model) -> FusionResult:
    """Rewrite every matching attention of ``model`` (an ``onnx.ModelProto``, changed in place) into
    ``com.microsoft.MultiHeadAttention``. The pattern and the conditions: docs/export.md."""
    import onnx
    from onnx import helper

    start = time.perf_counter()
    graph = model.graph
    G = _Graph(graph)
    default_axis = -1 if _opset(model) >= 13 else 1
    softmaxes = [n for n in G.nodes if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]
    matches: list[_Match] = []
    reasons: Counter = Counter()
    claimed: set[int] = set()
    for sm in softmaxes:
        try:
            m = _match(G, sm, default_axis)
        except _NoMatch as exc:
            reasons[str(exc)] += 1
            continue
        if any(id(n) in claimed for n in m.nodes):  # cannot happen with single consumers; be safe
            reasons["overlaps another match"] += 1
            continue
        claimed.update(id(n) for n in m.nodes)
        matches.append(m)

    if matches:
        names = {n.name for n in G.nodes}
        replace: dict[int, Any] = {}
        for m in matches:
            name = f"{m.scope}/MultiHeadAttention"
            while name in names:
                name += "_"
            names.add(name)
            replace[id(m.nodes[-1])] = helper.make_node(
                "MultiHeadAttention", [m.q, m.k, m.v], [m.out], name=name, domain=MS_DOMAIN,
                num_heads=int(m.heads), scale=float(m.scale))
        removed = {id(n) for m in matches for n in m.nodes[:-1]}
        seeds = [i for m in matches for n in m.nodes for i in n.input]
        removed |= _dead_producers(G, removed | set(replace), replace, seeds)

        kept, gone_outputs, candidates = [], set(), set()
        for n in G.nodes:
            if id(n) in removed or id(n) in replace:
                candidates.update(i for i in n.input if i in G.inits)
            if id(n) in removed:
                gone_outputs.update(n.output)
                continue
            node = onnx.NodeProto()
            node.CopyFrom(replace.get(id(n), n))
            kept.append(node)
        del graph.node[:]
        graph.node.extend(kept)
        _drop_unused_initializers(graph, candidates, G.pinned)
        vis = [vi for vi in graph.value_info if vi.name not in gone_outputs]
        del graph.value_info[:]
        graph.value_info.extend(vis)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        _check_topological(graph)

    left = sum(1 for n in graph.node if n.op_type == "Softmax")
    result = FusionResult(len(matches), left, time.perf_counter() - start, dict(reasons))
    if matches:
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, f"{result.describe()}; pass {PASS_VERSION}"
    return result


def _dead_producers(G: _Graph, removed: set[int], replace: dict[int, Any], seeds: list[str]) -> set[int]:
    """Nodes that only fed removed nodes (reshape targets, scale Constants), transitively: their outputs
    have no reader left. Only what the rewrite made dead is removed, nothing that was dead before."""
    readers: dict[str, int] = {}
    for n in G.nodes:
        if id(n) in removed and id(n) not in replace:
            continue
        node = replace.get(id(n), n)
        for i in node.input:
            readers[i] = readers.get(i, 0) + 1
    dead: set[int] = set()
    work = list(seeds)
    while work:
        name = work.pop()
        if readers.get(name, 0) or name in G.pinned:
            continue
        p = G.producer.get(name)
        if p is None or id(p) in removed or id(p) in dead:
            continue
        if any(readers.get(o, 0) or o in G.pinned for o in p.output):
            continue
        dead.add(id(p))
        for i in p.input:
            readers[i] = readers.get(i, 0) - 1
            work.append(i)
    return dead


def _drop_unused_initializers(graph, candidates: set[str], pinned: set[str]) -> None:
    """Remove the initializers among ``candidates`` that nothing reads any more (onnxruntime warns once per
    unused initializer otherwise). Initializers that are also graph inputs are kept."""
    used = {i for n in graph.node for i in n.input} | pinned | {i.name for i in graph.input}
    inits = graph.initializer
    for i in range(len(inits) - 1, -1, -1):
        if inits[i].name in candidates and inits[i].name not in used:
            del inits[i]


def _check_topological(graph) -> None:
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for n in graph.node:
        missing = [i for i in n.input if i not in known]
        if missing:
            raise RuntimeError(f"ort_fusion broke the graph: {n.name or n.op_type} reads {missing[0]} before "
                               "it is produced")
        known.update(n.output)


# -- files -----------------------------------------------------------------------------------------------


def write_ort_model(src: str | os.PathLike, dst: str | os.PathLike) -> OrtModelInfo:
    """Fuse the attention of the ONNX file ``src`` and save the result as ``dst`` (in the same folder) when
    at least one attention was fused; write nothing otherwise. The weights are not loaded: initializers in
    external data keep pointing at the data file ``src`` reads (returned as ``shared_data``), inline ones
    are written inline (the model is then under 2 GB, since ``src`` was)."""
    import onnx

    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    result = fuse_attention(model)
    if result.fused == 0:
        logger.info("%s: no attention to fuse (%s)", src, result.describe())
        return OrtModelInfo(dst, result, [], time.perf_counter() - start)
    shared = sorted(external_locations(model))
    if shared and src.resolve().parent != dst.resolve().parent:
        raise ValueError(f"{dst} must be written next to {src}: it shares its external data {shared}")
    with staging_dir(dst.parent) as tmp:
        onnx.save_model(model, str(tmp / dst.name))  # external weights stay where they are
        os.chmod(tmp / dst.name, file_mode())
        del model
        move_into_place({tmp / dst.name: dst})
    seconds = time.perf_counter() - start
    logger.info("%s: %s in %.1f s", dst, result.describe(), seconds)
    return OrtModelInfo(dst, result, [dst.name], seconds, shared)
