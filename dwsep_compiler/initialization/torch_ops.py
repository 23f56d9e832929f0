"""ONNX operators on torch tensors: what `finetune.OnnxModule` executes, one function per op.

The end-to-end stage trains through the whole graph when every operator is here: the CNN body
(convs, pools, normalization, elementwise math), and the heads and necks of real OCR and
detection exports (LSTM and GRU in every direction with sequence lengths and initial states,
Resize, Pad, Slice, Split, reductions, comparisons, Where, Cast, Expand, Tile, Softmax and
LogSoftmax, MatMul, Gather, ...). Each follows the ONNX spec's semantics for the attributes real
exporters use and is checked against onnxruntime (tests/initialization/test_torch_ops.py). `OPS` maps an op
type to ``run(inputs, attributes, opset) -> outputs`` (inputs: tensors, or None for absent
optional inputs); an attribute combination outside that raises `DwsepError`, which
`finetune.runnable_prefix` turns into a cut at that node, as for an op missing from `OPS`.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from dwsep_compiler.errors import DwsepError
from dwsep_compiler.model import same_pads


def model_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 13


def _resolve_pads(a: dict, x, kernel, strides, dilations) -> list[int]:
    rank = len(kernel)
    mode = a.get("auto_pad", "NOTSET")
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        return same_pads(x.shape[2:], kernel, strides, dilations, mode)
    if mode == "VALID":
        return [0] * (2 * rank)
    return list(a.get("pads", [0] * (2 * rank)))


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [b0, b1, e0, e1] -> F.pad's (last dim first) [b1, e1, b0, e0]."""
    rank = len(pads) // 2
    out = []
    for i in reversed(range(rank)):
        out += [pads[i], pads[i + rank]]
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _conv(x, w, b, a):
    rank = w.dim() - 2
    if rank not in _CONV:
        raise DwsepError(f"Conv with {rank} spatial dims is not supported by the torch executor")
    kernel = list(w.shape[2:])
    strides = list(a.get("strides", [1] * rank))
    dilations = list(a.get("dilations", [1] * rank))
    pads = _resolve_pads(a, x, kernel, strides, dilations)
    if pads[:rank] == pads[rank:]:
        padding = pads[:rank]
    else:
        x = F.pad(x, _torch_pad(pads))
        padding = [0] * rank
    return _CONV[rank](x, w, b, strides, padding, dilations, a.get("group", 1))


def _pool(x, a, kind):
    kernel = list(a["kernel_shape"])
    rank = len(kernel)
    strides = list(a.get("strides", [1] * rank))
    dilations = list(a.get("dilations", [1] * rank))
    pads = _resolve_pads(a, x, kernel, strides, dilations)
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "max":
        if any(pads):
            x = F.pad(x, _torch_pad(pads), value=float("-inf"))
        return _MAXPOOL[rank](x, kernel, strides, 0, dilations, ceil_mode=ceil)
    if any(d != 1 for d in dilations):
        raise DwsepError("AveragePool with dilations is not supported by the torch executor")
    if not any(pads):
        return _AVGPOOL[rank](x, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    padded = F.pad(x, _torch_pad(pads))
    total = _AVGPOOL[rank](padded, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    if a.get("count_include_pad", 0):
        return total
    ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(pads))
    share = _AVGPOOL[rank](ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    return total / share


def _softmax(x, a, opset):
    if opset >= 13:
        return torch.softmax(x, dim=a.get("axis", -1))
    axis = a.get("axis", 1) % x.dim()
    shape = x.shape
    flat = x.reshape(int(np.prod(shape[:axis])), -1)
    return torch.softmax(flat, dim=1).reshape(shape)


def _reshape(x, shape, a):
    dims = [int(d) for d in shape.tolist()]
    if not a.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _gemm(a_, b_, c, a):
    if a.get("transA", 0):
        a_ = a_.transpose(0, 1)
    if a.get("transB", 0):
        b_ = b_.transpose(0, 1)
    y = a.get("alpha", 1.0) * (a_ @ b_)
    if c is not None:
        y = y + a.get("beta", 1.0) * c
    return y


def _clip(x, inputs, a):
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else a.get("min")
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else a.get("max")
    if low is not None:
        x = torch.maximum(x, torch.as_tensor(low, dtype=x.dtype))
    if high is not None:
        x = torch.minimum(x, torch.as_tensor(high, dtype=x.dtype))
    return x


def _div(x, y):
    if not x.is_floating_point() and not y.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


def _constant(a):
    if "value" in a:
        return torch.from_numpy(numpy_helper.to_array(a["value"]).copy())
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    raise DwsepError("Constant without a numeric value is not supported by the torch executor")


def _shape(x, a):
    return torch.tensor(x.shape, dtype=torch.int64)[a.get("start", 0):a.get("end")]


def _gather(x, indices, a):
    axis = a.get("axis", 0) % x.dim()
    index = indices.long()
    index = torch.where(index < 0, index + x.shape[axis], index)
    out = x.index_select(axis, index.reshape(-1))
    return out.reshape((*x.shape[:axis], *index.shape, *x.shape[axis + 1:]))


def _axes(i: list, a: dict) -> list[int] | None:
    """Squeeze/Unsqueeze axes: an attribute before opset 13, the second input since."""
    if len(i) > 1 and i[1] is not None:
        return [int(v) for v in i[1].tolist()]
    return a.get("axes")


def _unsqueeze(x, axes):
    rank = x.dim() + len(axes)
    for axis in sorted(axis % rank for axis in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(x, axes):
    if axes is None:
        axes = [d for d, size in enumerate(x.shape) if size == 1]
    drop = {axis % x.dim() for axis in axes}
    return x.reshape([size for d, size in enumerate(x.shape) if d not in drop])


def _constant_of_shape(shape, a):
    value = (torch.from_numpy(numpy_helper.to_array(a["value"]).copy()).reshape(())
             if "value" in a else torch.zeros(()))
    return torch.full([int(d) for d in shape.tolist()], value.item(), dtype=value.dtype)



# ------------------------------------------------------------------------------ recurrent layers

def _rnn_activation(name: str, alpha: float | None, beta: float | None):
    """An ONNX RNN activation by name, with its alpha/beta (None: the spec's default)."""
    name = name.lower()
    if name == "sigmoid":
        return torch.sigmoid
    if name == "tanh":
        return torch.tanh
    if name == "relu":
        return torch.relu
    if name == "hardsigmoid":
        a, b = 0.2 if alpha is None else alpha, 0.5 if beta is None else beta
        return lambda x: torch.clamp(a * x + b, 0.0, 1.0)
    if name == "leakyrelu":
        return lambda x: F.leaky_relu(x, 0.01 if alpha is None else alpha)
    if name == "elu":
        return lambda x: F.elu(x, 1.0 if alpha is None else alpha)
    if name == "softsign":
        return F.softsign
    if name == "softplus":
        return F.softplus
    if name == "affine":
        a, b = 1.0 if alpha is None else alpha, 0.0 if beta is None else beta
        return lambda x: a * x + b
    if name == "scaledtanh":
        a, b = 1.0 if alpha is None else alpha, 1.0 if beta is None else beta
        return lambda x: a * torch.tanh(b * x)
    raise DwsepError(f"RNN activation {name} is not supported by the torch executor")


_TAKES_ALPHA = {"hardsigmoid", "leakyrelu", "elu", "affine", "scaledtanh", "thresholdedrelu"}
_TAKES_BETA = {"hardsigmoid", "affine", "scaledtanh"}


def _rnn_activations(a: dict, defaults: list[str], directions: int) -> list[list]:
    """Per direction, the gate activations: ``activations`` with ``activation_alpha``/``_beta``
    consumed in order by the functions that take them."""
    names = list(a.get("activations", defaults * directions))
    if len(names) == len(defaults) and directions == 2:
        names = names * 2
    alphas, betas = list(a.get("activation_alpha", [])), list(a.get("activation_beta", []))
    funcs = []
    for name in names:
        alpha = alphas.pop(0) if name.lower() in _TAKES_ALPHA and alphas else None
        beta = betas.pop(0) if name.lower() in _TAKES_BETA and betas else None
        funcs.append(_rnn_activation(name, alpha, beta))
    per = len(defaults)
    return [funcs[d * per:(d + 1) * per] for d in range(directions)]


def _recurrent(i: list, a: dict, gates: int, step_fn, defaults: list[str], with_cell: bool):
    """LSTM and GRU: layout, directions, sequence lengths, initial states; torch's fused
    recurrence where it computes the node (`_fusable`), else a loop over time steps where
    ``step_fn(x_proj, h, c, r, rb, p, funcs, clip) -> (h, c)`` advances one step."""
    x, w, r = i[0], i[1], i[2]
    b = i[3] if len(i) > 3 else None
    lens = i[4] if len(i) > 4 else None
    h0 = i[5] if len(i) > 5 else None
    c0 = i[6] if len(i) > 6 and with_cell else None
    peep = i[7] if len(i) > 7 and with_cell else None
    layout = a.get("layout", 0)
    if layout:
        x = x.transpose(0, 1)  # -> [seq, batch, input]
        h0 = h0.transpose(0, 1) if h0 is not None else None
        c0 = c0.transpose(0, 1) if c0 is not None else None
    hidden = a.get("hidden_size", r.shape[-1])
    direction = a.get("direction", "forward")
    funcs = _rnn_activations(a, defaults, 2 if direction == "bidirectional" else 1)
    clip = a.get("clip")
    if _fusable(a, defaults, clip, peep, lens, x.shape[0], with_cell):
        y, y_h, y_c = _fused_recurrent(x, w, r, b, h0, c0, hidden, direction, with_cell)
    else:
        y, y_h, y_c = _stepped_recurrent(x, w, r, b, lens, h0, c0, peep, hidden, direction,
                                         funcs, clip, gates, step_fn, a, with_cell)
    if layout:
        y = y.permute(2, 0, 1, 3)  # [batch, seq, dirs, hidden]
        y_h = y_h.transpose(0, 1)
        y_c = y_c.transpose(0, 1) if with_cell else None
    return [y, y_h, y_c] if with_cell else [y, y_h]


def _fusable(a: dict, defaults: list[str], clip, peep, lens, seq: int, with_cell: bool) -> bool:
    """Does torch's own LSTM/GRU compute this node? The default activations, no clip, no
    peepholes or coupled input-forget gate, every sequence at full length, and for a GRU the
    reset gate applied after the recurrent product (``linear_before_reset``, torch's form)."""
    names = [n.lower() for n in a.get("activations", [])]
    if names and any(n != d.lower() for n, d in zip(names, defaults * 2)):
        return False
    if clip is not None or peep is not None or a.get("input_forget", 0):
        return False
    if not with_cell and not a.get("linear_before_reset", 0):
        return False
    return lens is None or bool((lens == seq).all())


# torch's gate order from ONNX's: LSTM i, o, f, c -> i, f, g(=c), o; GRU z, r, h -> r, z, n.
_TORCH_GATES = {True: (0, 2, 3, 1), False: (1, 0, 2)}
_RNN_MODULES: dict[tuple, torch.nn.Module] = {}


def _fused_recurrent(x, w, r, b, h0, c0, hidden: int, direction: str, with_cell: bool):
    """The recurrence in torch's fused kernel (one call instead of a Python loop over time
    steps: an OCR model's BiLSTM head dominated its end-to-end step), with the node's weights
    passed to a cached module through `torch.func.functional_call`. ``direction="reverse"``
    runs forward over the time-reversed input."""
    seq, batch, size = x.shape
    directions = 2 if direction == "bidirectional" else 1
    key = (with_cell, size, hidden, directions)
    if key not in _RNN_MODULES:
        kind = torch.nn.LSTM if with_cell else torch.nn.GRU
        # On the meta device: only its structure is used, the weights are always passed in.
        _RNN_MODULES[key] = kind(size, hidden, bidirectional=directions == 2, device="meta")
    order = _TORCH_GATES[with_cell]

    def torch_gates(t):
        return torch.cat([t[g * hidden:(g + 1) * hidden] for g in order])

    gates = len(order)
    params = {}
    for d in range(directions):
        suffix = "_l0_reverse" if d else "_l0"
        bias = b[d] if b is not None else x.new_zeros(2 * gates * hidden)
        params["weight_ih" + suffix] = torch_gates(w[d])
        params["weight_hh" + suffix] = torch_gates(r[d])
        params["bias_ih" + suffix] = torch_gates(bias[:gates * hidden])
        params["bias_hh" + suffix] = torch_gates(bias[gates * hidden:])
    h = h0 if h0 is not None else x.new_zeros(directions, batch, hidden)
    state = (h, c0 if c0 is not None else x.new_zeros(directions, batch, hidden)) \
        if with_cell else h
    reverse = direction == "reverse"
    out, state = torch.func.functional_call(_RNN_MODULES[key], params,
                                            (x.flip(0) if reverse else x, state))
    y = out.reshape(seq, batch, directions, hidden).permute(0, 2, 1, 3)
    if reverse:
        y = y.flip(0)
    if with_cell:
        return y, state[0], state[1]
    return y, state, None


def _stepped_recurrent(x, w, r, b, lens, h0, c0, peep, hidden, direction, funcs, clip, gates,
                       step_fn, a, with_cell):
    """The recurrence one time step at a time (every ONNX attribute)."""
    seq, batch = x.shape[0], x.shape[1]
    directions = 2 if direction == "bidirectional" else 1
    lens = (torch.full((batch,), seq, dtype=torch.int64) if lens is None else lens.long())
    ys, hs, cs = [], [], []
    for d in range(directions):
        reverse = direction == "reverse" or d == 1
        wb = b[d, :gates * hidden] if b is not None else 0.0
        rb = b[d, gates * hidden:] if b is not None else None
        x_proj = torch.matmul(x, w[d].t()) + wb  # [seq, batch, gates*hidden]
        h = h0[d] if h0 is not None else x.new_zeros(batch, hidden)
        c = (c0[d] if c0 is not None else x.new_zeros(batch, hidden)) if with_cell else None
        p = peep[d] if peep is not None else None
        out = [None] * seq
        for t in (range(seq - 1, -1, -1) if reverse else range(seq)):
            valid = (t < lens).to(x.dtype).unsqueeze(1)
            h_new, c_new = step_fn(x_proj[t], h, c, r[d], rb, p, funcs[d], clip, a)
            h = valid * h_new + (1 - valid) * h
            if with_cell:
                c = valid * c_new + (1 - valid) * c
            out[t] = valid * h_new
        ys.append(torch.stack(out))  # [seq, batch, hidden]
        hs.append(h)
        cs.append(c)
    y = torch.stack(ys, dim=1)  # [seq, dirs, batch, hidden]
    return y, torch.stack(hs), torch.stack(cs) if with_cell else None


def _clipped(v, clip):
    return v if clip is None else torch.clamp(v, -clip, clip)


def _lstm_step(xp, h, c, r, rb, p, funcs, clip, a):
    f, g, hfun = funcs
    gates = xp + torch.matmul(h, r.t()) + (rb if rb is not None else 0.0)
    gi, go, gf, gc = gates.chunk(4, dim=1)  # ONNX gate order: i, o, f, c
    if p is not None:
        pi, po, pf = p.chunk(3)
        gi, gf = gi + pi * c, gf + pf * c
    i_t = f(_clipped(gi, clip))
    f_t = 1 - i_t if a.get("input_forget", 0) else f(_clipped(gf, clip))
    c_t = f_t * c + i_t * g(_clipped(gc, clip))
    if p is not None:
        go = go + po * c_t
    o_t = f(_clipped(go, clip))
    return o_t * hfun(c_t), c_t


def _gru_step(xp, h, c, r, rb, p, funcs, clip, a):
    f, g = funcs
    hidden = h.shape[1]
    rz, rr, rh = r.split(hidden, dim=0)
    bz, br, bh = (rb.split(hidden) if rb is not None else (0.0, 0.0, 0.0))
    xz, xr, xh = xp.chunk(3, dim=1)  # ONNX gate order: z, r, h
    z = f(_clipped(xz + torch.matmul(h, rz.t()) + bz, clip))
    reset = f(_clipped(xr + torch.matmul(h, rr.t()) + br, clip))
    if a.get("linear_before_reset", 0):
        cand = xh + reset * (torch.matmul(h, rh.t()) + bh)
    else:
        cand = xh + torch.matmul(reset * h, rh.t()) + bh
    h_t = g(_clipped(cand, clip))
    return (1 - z) * h_t + z * h, None


def _lstm(i, a, opset):
    return _recurrent(i, a, 4, _lstm_step, ["Sigmoid", "Tanh", "Tanh"], with_cell=True)


def _gru(i, a, opset):
    return _recurrent(i, a, 3, _gru_step, ["Sigmoid", "Tanh"], with_cell=False)


# ------------------------------------------------------------------------------ shapes and slices

def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _slice(i, a, opset):
    x = i[0]
    if opset < 10:
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends = _ints(i[1]), _ints(i[2])
        axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else None
        steps = _ints(i[4]) if len(i) > 4 and i[4] is not None else None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        size = x.shape[axis]
        if step > 0:
            start = min(max(start + size if start < 0 else start, 0), size)
            end = min(max(end + size if end < 0 else end, 0), size)
            index[axis] = slice(start, max(start, end), step)
        else:  # negative step: walk the flipped axis forward
            start = min(max(start + size if start < 0 else start, -1), size - 1)
            end = min(max(end + size if end < 0 else end, -1), size - 1)
            first, last = size - 1 - start, size - 1 - end
            index[axis] = slice(first, max(first, last), -step)
            flips.append(axis)
    if flips:
        x = torch.flip(x, flips)
    return [x[tuple(index)]]


def _split(i, a, opset):
    x = i[0]
    axis = a.get("axis", 0) % x.dim()
    sizes = (_ints(i[1]) if len(i) > 1 and i[1] is not None else a.get("split"))
    if sizes is None:
        parts = a.get("num_outputs") or a["_outputs"]
        chunk = -(-x.shape[axis] // parts)
        sizes = [min(chunk, x.shape[axis] - k * chunk) for k in range(parts)]
    return list(torch.split(x, list(sizes), dim=axis))


def _pad(i, a, opset):
    x = i[0]
    if opset < 11:
        pads, value = list(a["pads"]), a.get("value", 0.0)
    else:
        pads = _ints(i[1])
        value = float(i[2].reshape(-1)[0]) if len(i) > 2 and i[2] is not None else 0.0
    axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(x.dim()))
    full = [0] * (2 * x.dim())
    for k, axis in enumerate(axes):
        axis %= x.dim()
        full[axis], full[axis + x.dim()] = pads[k], pads[k + len(axes)]
    mode = a.get("mode", "constant")
    torch_pads = _torch_pad(full)
    while len(torch_pads) > 2 and torch_pads[-1] == 0 and torch_pads[-2] == 0:
        torch_pads = torch_pads[:-2]  # reflect/replicate pad only trailing dims
    if mode == "constant":
        return [F.pad(x, torch_pads, value=value)]
    if mode in ("reflect", "edge"):
        if len(torch_pads) // 2 > x.dim() - 2 or any(v < 0 for v in torch_pads):
            raise DwsepError(f"Pad mode {mode} on the batch/channel axes is not supported by "
                             "the torch executor")
        return [F.pad(x, torch_pads, mode="reflect" if mode == "reflect" else "replicate")]
    raise DwsepError(f"Pad mode {mode} is not supported by the torch executor")


def _expand(i, a, opset):
    shape = torch.broadcast_shapes(tuple(i[0].shape), tuple(_ints(i[1])))
    return [i[0].expand(shape)]


def _tile(i, a, opset):
    return [i[0].repeat(*_ints(i[1]))]


_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
           onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT64: torch.int64,
           onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT8: torch.int8,
           onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
           onnx.TensorProto.INT16: torch.int16}


def _cast(i, a, opset):
    to = a["to"]
    if to not in _DTYPES:
        raise DwsepError(f"Cast to ONNX type {to} is not supported by the torch executor")
    return [i[0].to(_DTYPES[to])]


def _range(i, a, opset):
    start, limit, delta = (v.reshape(()).item() for v in i[:3])
    return [torch.arange(start, limit, delta, dtype=i[0].dtype)]


# ------------------------------------------------------------------------------ reductions

def _reduce(kind: str):
    def run(i, a, opset):
        x = i[0]
        # ReduceSum takes axes as an input from opset 13, the others from opset 18.
        from_input = opset >= (13 if kind == "sum" else 18)
        axes = (_ints(i[1]) if from_input and len(i) > 1 and i[1] is not None
                else a.get("axes"))
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        dims = sorted(axis % x.dim() for axis in axes)
        if kind == "mean":
            return [x.mean(dim=dims, keepdim=keep)]
        if kind == "sum":
            return [x.sum(dim=dims, keepdim=keep)]
        if kind == "prod":
            out = x
            for d in reversed(dims):
                out = out.prod(dim=d, keepdim=keep)
            return [out]
        if kind == "l2":
            return [x.pow(2).sum(dim=dims, keepdim=keep).sqrt()]
        out = x.amax(dim=dims, keepdim=keep) if kind == "max" else x.amin(dim=dims, keepdim=keep)
        return [out]
    return run


def _argmax(kind: str):
    def run(i, a, opset):
        x = i[0]
        axis = a.get("axis", 0) % x.dim()
        keep = bool(a.get("keepdims", 1))
        if a.get("select_last_index", 0):
            flipped = torch.flip(x, [axis])
            idx = (flipped.argmax(axis, keepdim=keep) if kind == "max"
                   else flipped.argmin(axis, keepdim=keep))
            return [x.shape[axis] - 1 - idx]
        return [x.argmax(axis, keepdim=keep) if kind == "max" else x.argmin(axis, keepdim=keep)]
    return run


def _log_softmax(i, a, opset):
    x = i[0]
    if opset >= 13:
        return [torch.log_softmax(x, dim=a.get("axis", -1))]
    axis = a.get("axis", 1) % x.dim()
    flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
    return [torch.log_softmax(flat, dim=1).reshape(x.shape)]


def _layer_norm(i, a, opset):
    x, scale = i[0], i[1]
    bias = i[2] if len(i) > 2 else None
    axis = a.get("axis", -1) % x.dim()
    shape = list(x.shape[axis:])
    return [F.layer_norm(x, shape, scale.expand(shape), None if bias is None else
                         bias.expand(shape), a.get("epsilon", 1e-5))]


def _instance_norm(i, a, opset):
    return [F.instance_norm(i[0], weight=i[1], bias=i[2], eps=a.get("epsilon", 1e-5))]


# ------------------------------------------------------------------------------ resizing

def _source_coords(out_size: int, in_size: int, scale: float, mode: str):
    """ONNX Resize's coordinate transform: the input coordinate of each output index."""
    x = torch.arange(out_size, dtype=torch.float64)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_size > 1 else torch.zeros_like(x)
    if mode == "align_corners":
        return x * (in_size - 1) / (out_size - 1) if out_size > 1 else torch.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "half_pixel_symmetric":
        adjustment = out_size / (scale * in_size)
        center = in_size / 2
        offset = center * (1 - adjustment)
        return offset + (x + 0.5) / scale - 0.5
    raise DwsepError(f"Resize coordinate_transformation_mode {mode} is not supported by the "
                     "torch executor")


def _nearest(coords: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "round_prefer_floor":
        return torch.where(coords - torch.floor(coords) == 0.5, torch.floor(coords),
                           torch.round(coords))
    if mode == "round_prefer_ceil":
        return torch.floor(coords + 0.5)
    if mode == "floor":
        return torch.floor(coords)
    if mode == "ceil":
        return torch.ceil(coords)
    raise DwsepError(f"Resize nearest_mode {mode} is not supported by the torch executor")


def _resize(i, a, opset):
    x = i[0]
    if opset < 11:  # Resize-10 / Upsample: X, scales (Upsample-7: an attribute); asymmetric
        scales = ([float(v) for v in a["scales"]] if "scales" in a
                  else [float(v) for v in i[1].reshape(-1).tolist()])
        sizes = [int(math.floor(n * s)) for n, s in zip(x.shape, scales)]
        transform, nearest_mode = "asymmetric", "floor"
    else:
        scales_in = i[2] if len(i) > 2 and i[2] is not None and i[2].numel() else None
        sizes_in = i[3] if len(i) > 3 and i[3] is not None and i[3].numel() else None
        if sizes_in is not None:
            sizes = _ints(sizes_in)
            scales = [o / n for o, n in zip(sizes, x.shape)]
        else:
            scales = [float(v) for v in scales_in.reshape(-1).tolist()]
            sizes = [int(math.floor(n * s)) for n, s in zip(x.shape, scales)]
        transform = a.get("coordinate_transformation_mode", "half_pixel")
        nearest_mode = a.get("nearest_mode", "round_prefer_floor")
    mode = a.get("mode", "nearest")
    if mode not in ("nearest", "linear"):
        raise DwsepError(f"Resize mode {mode} is not supported by the torch executor")
    if a.get("antialias", 0) or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise DwsepError("Resize with antialias or keep_aspect_ratio_policy is not supported "
                         "by the torch executor")
    out = x
    for axis, (n_in, n_out, scale) in enumerate(zip(x.shape, sizes, scales)):
        if n_in == n_out and scale == 1.0:
            continue
        coords = _source_coords(n_out, n_in, scale, transform)
        if mode == "nearest":
            index = _nearest(coords, nearest_mode).clamp(0, n_in - 1).long()
            out = out.index_select(axis, index)
            continue
        coords = coords.clamp(0, n_in - 1)
        low = torch.floor(coords).long()
        high = (low + 1).clamp(max=n_in - 1)
        weight = (coords - low).to(x.dtype)
        shape = [1] * x.dim()
        shape[axis] = n_out
        weight = weight.reshape(shape)
        out = (out.index_select(axis, low) * (1 - weight)
               + out.index_select(axis, high) * weight)
    return [out]


# ------------------------------------------------------------------------------ the table

def _unary(fn) -> Callable:
    return lambda i, a, opset: [fn(i[0])]


def _binary(fn) -> Callable:
    return lambda i, a, opset: [fn(i[0], i[1])]


def _variadic(fn) -> Callable:
    def run(i, a, opset):
        out = i[0]
        for other in i[1:]:
            out = fn(out, other)
        return [out]
    return run


def _hard_sigmoid(i, a, opset):
    return [torch.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0.0, 1.0)]


def _prelu(i, a, opset):
    x, slope = i[0], i[1]
    return [torch.where(x >= 0, x, x * slope)]


def _flatten(i, a, opset):
    axis = a.get("axis", 1)
    axis = axis + i[0].dim() if axis < 0 else axis
    return [i[0].reshape(int(np.prod(i[0].shape[:axis])), -1)]


def _batch_norm(i, a, opset):
    return [F.batch_norm(i[0], i[3], i[4], i[1], i[2], training=False,
                         eps=a.get("epsilon", 1e-5))]


def _where(i, a, opset):
    return [torch.where(i[0].bool(), i[1], i[2])]


OPS: dict[str, Callable[[list, dict, int], list]] = {
    "Conv": lambda i, a, o: [_conv(i[0], i[1], i[2] if len(i) > 2 else None, a)],
    "Relu": _unary(torch.relu),
    "Clip": lambda i, a, o: [_clip(i[0], i, a)],
    "LeakyRelu": lambda i, a, o: [F.leaky_relu(i[0], a.get("alpha", 0.01))],
    "PRelu": _prelu,
    "Sigmoid": _unary(torch.sigmoid),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _unary(F.hardswish),
    "Tanh": _unary(torch.tanh),
    "Elu": lambda i, a, o: [F.elu(i[0], a.get("alpha", 1.0))],
    "Softplus": _unary(F.softplus),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Erf": _unary(torch.erf),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Not": _unary(torch.logical_not),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pow": _binary(torch.pow),
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Where": _where,
    "MaxPool": lambda i, a, o: [_pool(i[0], a, "max")],
    "AveragePool": lambda i, a, o: [_pool(i[0], a, "avg")],
    "GlobalAveragePool": _unary(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": _unary(lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm,
    "Flatten": _flatten,
    "Reshape": lambda i, a, o: [_reshape(i[0], i[1], a)],
    "Gemm": lambda i, a, o: [_gemm(i[0], i[1], i[2] if len(i) > 2 else None, a)],
    "MatMul": _binary(torch.matmul),
    "Concat": lambda i, a, o: [torch.cat(i, dim=a["axis"])],
    "Softmax": lambda i, a, o: [_softmax(i[0], a, o)],
    "LogSoftmax": _log_softmax,
    "Transpose": lambda i, a, o: [i[0].permute(*a.get("perm",
                                                      list(reversed(range(i[0].dim())))))],
    "Identity": _unary(lambda x: x),
    "Dropout": lambda i, a, o: [i[0], torch.ones_like(i[0], dtype=torch.bool)],  # inference
    "Constant": lambda i, a, o: [_constant(a)],
    "Shape": lambda i, a, o: [_shape(i[0], a)],
    "Gather": lambda i, a, o: [_gather(i[0], i[1], a)],
    "Unsqueeze": lambda i, a, o: [_unsqueeze(i[0], _axes(i, a))],
    "Squeeze": lambda i, a, o: [_squeeze(i[0], _axes(i, a))],
    "ConstantOfShape": lambda i, a, o: [_constant_of_shape(i[0], a)],
    "Slice": _slice,
    "Split": _split,
    "Pad": _pad,
    "Expand": _expand,
    "Tile": _tile,
    "Cast": _cast,
    "Range": _range,
    "ReduceMean": _reduce("mean"),
    "ReduceSum": _reduce("sum"),
    "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"),
    "ReduceProd": _reduce("prod"),
    "ReduceL2": _reduce("l2"),
    "ArgMax": _argmax("max"),
    "ArgMin": _argmax("min"),
    "Resize": _resize,
    "Upsample": _resize,
    "LSTM": _lstm,
    "GRU": _gru,
}
SUPPORTED_OPS = frozenset(OPS)
# Ops whose output is the input's shape, not a function of its values: no gradient flows through.
SHAPE_ONLY = frozenset(("Shape",))


def run_node(op: str, inputs: list, attributes: dict, opset: int) -> list:
    """Outputs (a list) of one ONNX node on torch tensors ``inputs`` (None for absent ones)."""
    if op not in OPS:
        raise DwsepError(f"operator {op} is not supported by the torch executor (finetune)")
    return OPS[op](inputs, attributes, opset)


def supported(node: onnx.NodeProto) -> bool:
    """Whether `finetune.OnnxModule` can run ``node``."""
    return node.domain in ("", "ai.onnx") and node.op_type in SUPPORTED_OPS


def node_attributes(node: onnx.NodeProto) -> dict:
    """The node's attributes as Python values, plus ``_outputs``: its output count (a Split
    without sizes splits into that many parts)."""
    out = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        out[a.name] = value.decode() if isinstance(value, bytes) else value
    out["_outputs"] = len(node.output)
    return out
