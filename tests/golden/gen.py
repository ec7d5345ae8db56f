#!/usr/bin/env python3
"""Generate the PyTorch reference ("golden") files used by kiln's tests.

Usage:
    python tests/golden/gen.py

Writes one `<case>.safetensors` file per case into `data/` next to this
script. Requires PyTorch and safetensors. See README.md for the naming
convention.
"""

import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")

DTYPE = torch.float32


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def path_for(case):
    return os.path.join(DATA, case + ".safetensors")


def save(case, tensors, meta=None):
    """Write `tensors` (name -> tensor) and string metadata for `case`."""
    meta = {k: str(v) for k, v in (meta or {}).items()}
    clean = {}
    for name, t in tensors.items():
        t = t.detach()
        if t.is_floating_point():
            t = t.to(DTYPE)
        clean[name] = t.contiguous().clone()
    path = path_for(case)
    save_file(clean, path, metadata=meta)
    print(f"{os.path.relpath(path, HERE):45s} {os.path.getsize(path):7d} bytes")


def ints(*xs):
    return ",".join(str(int(x)) for x in xs)


def randn(*shape):
    return torch.randn(tuple(shape), dtype=DTYPE)


def leaf(t):
    return t.to(DTYPE).detach().requires_grad_(True)


def forward_backward(fn, inputs, diff):
    """Run `fn(**inputs)`, draw a random upstream gradient and backprop.

    Returns a dict with `out`, `grad_out` and `grad_<name>` for every name in
    `diff` (the gradients of `(out * grad_out).sum()`).
    """
    out = fn(**inputs)
    grad_out = randn(*out.shape)
    targets = [inputs[n] for n in diff]
    grads = torch.autograd.grad((out * grad_out).sum(), targets)
    res = {"out": out, "grad_out": grad_out}
    for n, g in zip(diff, grads):
        res["grad_" + n] = g
    return res


# ---------------------------------------------------------------------------
# convolutions
# ---------------------------------------------------------------------------


def conv2d_case(case, x_shape, w_shape, bias, stride, padding, dilation):
    torch.manual_seed(0)
    inputs = {"x": leaf(randn(*x_shape)), "weight": leaf(randn(*w_shape) * 0.3)}
    diff = ["x", "weight"]
    if bias:
        inputs["bias"] = leaf(randn(w_shape[0]) * 0.1)
        diff.append("bias")

    def fn(x, weight, bias=None):
        return F.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation)

    res = forward_backward(fn, inputs, diff)
    meta = {
        "stride": ints(*stride),
        "padding": ints(*padding),
        "dilation": ints(*dilation),
        "bias": "true" if bias else "false",
    }
    save(case, {**inputs, **res}, meta)


def conv2d_a():
    conv2d_case("conv2d_a", (2, 3, 7, 6), (4, 3, 3, 3), True, (2, 2), (1, 1), (1, 1))


def conv2d_b():
    conv2d_case("conv2d_b", (3, 2, 9, 8), (5, 2, 3, 2), False, (1, 2), (2, 0), (2, 1))


def conv2d_dcgan():
    conv2d_case("conv2d_dcgan", (2, 3, 8, 8), (5, 3, 4, 4), True, (2, 2), (1, 1), (1, 1))


def conv_transpose2d_case(case, x_shape, w_shape, bias, stride, padding, output_padding, dilation):
    torch.manual_seed(0)
    # PyTorch layout: weight is (in_channels, out_channels, kh, kw).
    inputs = {"x": leaf(randn(*x_shape)), "weight": leaf(randn(*w_shape) * 0.3)}
    diff = ["x", "weight"]
    if bias:
        inputs["bias"] = leaf(randn(w_shape[1]) * 0.1)
        diff.append("bias")

    def fn(x, weight, bias=None):
        return F.conv_transpose2d(
            x,
            weight,
            bias,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            dilation=dilation,
        )

    res = forward_backward(fn, inputs, diff)
    meta = {
        "stride": ints(*stride),
        "padding": ints(*padding),
        "output_padding": ints(*output_padding),
        "dilation": ints(*dilation),
        "bias": "true" if bias else "false",
    }
    save(case, {**inputs, **res}, meta)


def conv_transpose2d_a():
    conv_transpose2d_case(
        "conv_transpose2d_a", (2, 4, 5, 3), (4, 3, 4, 4), True, (2, 2), (1, 1), (1, 0), (1, 1)
    )


def conv_transpose2d_b():
    conv_transpose2d_case(
        "conv_transpose2d_b", (1, 3, 4, 4), (3, 2, 3, 3), False, (3, 2), (0, 1), (2, 1), (1, 1)
    )


def conv_transpose2d_c():
    conv_transpose2d_case(
        "conv_transpose2d_c", (2, 2, 3, 3), (2, 3, 3, 2), True, (2, 1), (1, 0), (0, 0), (2, 2)
    )


# ---------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------


def batch_norm_case(case, training):
    torch.manual_seed(0)
    momentum, eps = 0.1, 1e-5
    x = leaf(randn(4, 3, 5, 5) * 2.0 + 0.5)
    weight = leaf(1.0 + 0.3 * randn(3))
    bias = leaf(0.2 * randn(3))
    running_mean = 0.5 * randn(3)
    running_var = 0.5 + torch.rand(3, dtype=DTYPE)

    rm = running_mean.clone()
    rv = running_var.clone()

    def fn(x, weight, bias):
        return F.batch_norm(x, rm, rv, weight, bias, training=training, momentum=momentum, eps=eps)

    res = forward_backward(fn, {"x": x, "weight": weight, "bias": bias}, ["x", "weight", "bias"])
    tensors = {
        "x": x,
        "weight": weight,
        "bias": bias,
        "running_mean": running_mean,
        "running_var": running_var,
        **res,
    }
    if training:
        tensors["running_mean_after"] = rm
        tensors["running_var_after"] = rv
    meta = {
        "momentum": str(momentum),
        "eps": str(eps),
        "training": "true" if training else "false",
    }
    save(case, tensors, meta)


def batch_norm2d_train():
    batch_norm_case("batch_norm2d_train", True)


def batch_norm2d_eval():
    batch_norm_case("batch_norm2d_eval", False)


def layer_norm():
    torch.manual_seed(0)
    eps = 1e-5
    inputs = {
        "x": leaf(randn(2, 3, 7) * 1.5 + 0.3),
        "weight": leaf(1.0 + 0.3 * randn(7)),
        "bias": leaf(0.2 * randn(7)),
    }

    def fn(x, weight, bias):
        return F.layer_norm(x, (7,), weight, bias, eps=eps)

    res = forward_backward(fn, inputs, ["x", "weight", "bias"])
    save("layer_norm", {**inputs, **res}, {"eps": str(eps), "normalized_shape": "7"})


# ---------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------


def leaky_relu():
    torch.manual_seed(0)
    slope = 0.2
    x = randn(3, 7)
    # A few values very close to zero on both sides (never exactly zero).
    x[0, :4] = torch.tensor([1e-3, -1e-3, 2e-4, -5e-4], dtype=DTYPE)
    x[x == 0] = 1e-3
    inputs = {"x": leaf(x)}
    res = forward_backward(lambda x: F.leaky_relu(x, slope), inputs, ["x"])
    save("leaky_relu", {**inputs, **res}, {"slope": str(slope)})


def gelu_case(approximate):
    torch.manual_seed(0)
    inputs = {"x": leaf(randn(5, 9) * 2.0)}
    res = forward_backward(lambda x: F.gelu(x, approximate=approximate), inputs, ["x"])
    save("gelu_" + approximate, {**inputs, **res}, {"approximate": approximate})


def gelu_none():
    gelu_case("none")


def gelu_tanh():
    gelu_case("tanh")


def softmax():
    torch.manual_seed(0)
    inputs = {"x": leaf(randn(4, 9) * 3.0)}
    res = forward_backward(lambda x: F.softmax(x, dim=-1), inputs, ["x"])
    save("softmax", {**inputs, **res}, {"dim": "-1"})


def log_softmax():
    torch.manual_seed(0)
    inputs = {"x": leaf(randn(4, 9) * 3.0)}
    res = forward_backward(lambda x: F.log_softmax(x, dim=-1), inputs, ["x"])
    save("log_softmax", {**inputs, **res}, {"dim": "-1"})


def softmax_dim0():
    """Softmax along the first of three dims (not the rows)."""
    torch.manual_seed(0)
    inputs = {"x": leaf(randn(3, 4, 5) * 3.0)}
    res = forward_backward(lambda x: F.softmax(x, dim=0), inputs, ["x"])
    save("softmax_dim0", {**inputs, **res}, {"dim": "0"})


def log_softmax_dim1():
    """Log-softmax along the middle of three dims, named from the back (-2)."""
    torch.manual_seed(0)
    inputs = {"x": leaf(randn(3, 4, 5) * 3.0)}
    res = forward_backward(lambda x: F.log_softmax(x, dim=-2), inputs, ["x"])
    save("log_softmax_dim1", {**inputs, **res}, {"dim": "-2"})


# ---------------------------------------------------------------------------
# losses (scalar output; `out` and `grad_out` are 0-dim)
# ---------------------------------------------------------------------------


def cross_entropy():
    torch.manual_seed(0)
    x = leaf(randn(6, 5) * 2.0)
    target = torch.randint(0, 5, (6,), dtype=torch.int64)
    res = forward_backward(
        lambda x: F.cross_entropy(x, target, reduction="mean"), {"x": x}, ["x"]
    )
    save("cross_entropy", {"x": x, "target": target, **res}, {"reduction": "mean"})


def bce_with_logits():
    torch.manual_seed(0)
    x = leaf(randn(4, 7) * 2.0)
    target = torch.rand(4, 7, dtype=DTYPE)
    res = forward_backward(
        lambda x: F.binary_cross_entropy_with_logits(x, target, reduction="mean"), {"x": x}, ["x"]
    )
    save("bce_with_logits", {"x": x, "target": target, **res}, {"reduction": "mean"})


def mse():
    torch.manual_seed(0)
    x = leaf(randn(3, 5))
    target = randn(3, 5)
    res = forward_backward(lambda x: F.mse_loss(x, target, reduction="mean"), {"x": x}, ["x"])
    save("mse", {"x": x, "target": target, **res}, {"reduction": "mean"})


# ---------------------------------------------------------------------------
# attention / embedding
# ---------------------------------------------------------------------------


def attention():
    torch.manual_seed(0)
    shape = (2, 3, 5, 4)  # batch, heads, seq, head_dim
    inputs = {"q": leaf(randn(*shape)), "k": leaf(randn(*shape)), "v": leaf(randn(*shape))}

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    res = forward_backward(fn, inputs, ["q", "k", "v"])
    meta = {"is_causal": "true", "scale": repr(1.0 / math.sqrt(shape[-1]))}
    save("attention", {**inputs, **res}, meta)


def embedding():
    torch.manual_seed(0)
    weight = leaf(randn(7, 5))
    ids = torch.tensor([[1, 4, 6, 1], [0, 4, 4, 3]], dtype=torch.int64)  # 1 and 4 repeat
    res = forward_backward(lambda weight: F.embedding(ids, weight), {"weight": weight}, ["weight"])
    save("embedding", {"weight": weight, "ids": ids, **res}, {"num_embeddings": "7", "dim": "5"})


# ---------------------------------------------------------------------------
# optimisers
# ---------------------------------------------------------------------------

STEPS = 3


def run_optimizer(make_opt):
    """Three steps on two parameters with fixed random gradients."""
    torch.manual_seed(0)
    param_a = randn(3, 4)
    param_b = randn(5)
    pa = param_a.clone().requires_grad_(True)
    pb = param_b.clone().requires_grad_(True)
    opt = make_opt([pa, pb])
    tensors = {"param_a": param_a, "param_b": param_b}
    for s in range(1, STEPS + 1):
        ga = randn(3, 4)
        gb = randn(5)
        pa.grad = ga.clone()
        pb.grad = gb.clone()
        opt.step()
        tensors[f"grad_a_s{s}"] = ga
        tensors[f"grad_b_s{s}"] = gb
        tensors[f"param_a_s{s}"] = pa.detach().clone()
        tensors[f"param_b_s{s}"] = pb.detach().clone()
    return opt, pa, pb, tensors


def adam_case(case, cls):
    lr, beta1, beta2, eps, wd = 0.01, 0.9, 0.999, 1e-8, 0.1
    opt, pa, pb, tensors = run_optimizer(
        lambda ps: cls(ps, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, foreach=False)
    )
    for suffix, p in (("a", pa), ("b", pb)):
        st = opt.state[p]
        tensors[f"exp_avg_{suffix}"] = st["exp_avg"]
        tensors[f"exp_avg_sq_{suffix}"] = st["exp_avg_sq"]
    meta = {
        "lr": str(lr),
        "beta1": str(beta1),
        "beta2": str(beta2),
        "eps": str(eps),
        "weight_decay": str(wd),
        "steps": str(STEPS),
    }
    save(case, tensors, meta)


def adam():
    adam_case("adam", torch.optim.Adam)


def adamw():
    adam_case("adamw", torch.optim.AdamW)


def sgd_momentum():
    lr, momentum, wd = 0.1, 0.9, 0.01
    opt, pa, pb, tensors = run_optimizer(
        lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum, weight_decay=wd, foreach=False)
    )
    tensors["momentum_buffer_a"] = opt.state[pa]["momentum_buffer"]
    tensors["momentum_buffer_b"] = opt.state[pb]["momentum_buffer"]
    meta = {
        "lr": str(lr),
        "momentum": str(momentum),
        "dampening": "0.0",
        "nesterov": "false",
        "weight_decay": str(wd),
        "steps": str(STEPS),
    }
    save("sgd_momentum", tensors, meta)


# ---------------------------------------------------------------------------
# a small trained module, state_dict saved exactly as PyTorch writes it
# ---------------------------------------------------------------------------


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(F.leaky_relu(self.bn(self.conv(x)), 0.2).flatten(1))


def state_dict_small():
    torch.manual_seed(0)
    model = Small()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(2):
        xb = randn(6, 1, 5, 5) * 1.5 + 0.4
        yb = torch.randint(0, 3, (6,))
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    model.eval()

    path = path_for("state_dict_small")
    save_file(model.state_dict(), path)
    print(f"{os.path.relpath(path, HERE):45s} {os.path.getsize(path):7d} bytes")

    x = randn(2, 1, 5, 5)
    with torch.no_grad():
        out = model(x)
    save("state_dict_small_io", {"x": x, "out": out}, {"negative_slope": "0.2", "mode": "eval"})


# ---------------------------------------------------------------------------

def image_folder_transforms():
    """torchvision's Resize(12) + CenterCrop(12) on PIL RGB images of four
    shapes (shrinking and growing, wide and tall), then PIL's grey
    conversion: what kiln's image-folder loader must reproduce. Needs
    torchvision and Pillow (imported here so the other cases do not)."""
    from PIL import Image
    from torchvision import transforms

    torch.manual_seed(0)
    size = 12
    resize_and_crop = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])
    tensors = {}
    shapes = [(23, 37), (37, 23), (11, 30), (13, 9)]  # (height, width)
    for i, (h, w) in enumerate(shapes):
        pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8)
        image = Image.frombytes("RGB", (w, h), bytes(pixels.flatten().tolist()))
        out = resize_and_crop(image)
        assert out.size == (size, size)
        rgb = torch.tensor(list(out.getdata()), dtype=DTYPE).reshape(size, size, 3)
        grey = torch.tensor(list(out.convert("L").getdata()), dtype=DTYPE)
        tensors[f"input{i}"] = pixels.to(DTYPE)
        tensors[f"rgb{i}"] = rgb.permute(2, 0, 1)
        tensors[f"grey{i}"] = grey.reshape(1, size, size)
    save("image_folder_transforms", tensors, {"size": size, "count": len(shapes)})


def matmul_vectors():
    """torch.matmul with 1-D operands: a vector times a batch of matrices,
    a batch of matrices times a vector, and a dot product."""
    torch.manual_seed(0)
    inputs = {
        "v": leaf(randn(5)),
        "w": leaf(randn(5)),
        "batch": leaf(randn(3, 5, 4)),
        "mats": leaf(randn(2, 3, 5)),
    }
    v, w, batch, mats = inputs["v"], inputs["w"], inputs["batch"], inputs["mats"]
    outs = {
        "vec_mat": torch.matmul(v, batch),
        "mat_vec": torch.matmul(mats, w),
        "dot": torch.matmul(v, w),
    }
    upstream = {k: randn(*o.shape) for k, o in outs.items()}
    total = sum((outs[k] * upstream[k]).sum() for k in outs)
    total.backward()
    tensors = dict(inputs)
    tensors.update({k: o.detach() for k, o in outs.items()})
    tensors.update({f"g_{k}": u for k, u in upstream.items()})
    tensors.update({f"grad_{k}": t.grad for k, t in inputs.items()})
    save("matmul_vectors", tensors)

# ---------------------------------------------------------------------------
# norm options: layer_norm over trailing dims, BatchNorm2d momentum=None /
# track_running_stats=False / affine=False, embedding padding_idx
# ---------------------------------------------------------------------------


def layer_norm_trailing_dims():
    """F.layer_norm over the last two dims with weight and bias of that
    shape, and over the last three dims without them."""
    torch.manual_seed(0)
    eps = 1e-5
    inputs = {
        "x": leaf(randn(2, 3, 4, 5) * 1.5 + 0.3),
        "weight": leaf(1.0 + 0.3 * randn(4, 5)),
        "bias": leaf(0.2 * randn(4, 5)),
    }
    outs = {
        "out": F.layer_norm(inputs["x"], (4, 5), inputs["weight"], inputs["bias"], eps=eps),
        "out_plain": F.layer_norm(inputs["x"], (3, 4, 5), eps=eps),
    }
    upstream = {k: randn(*o.shape) for k, o in outs.items()}
    total = sum((outs[k] * upstream[k]).sum() for k in outs)
    total.backward()
    tensors = dict(inputs)
    tensors.update({k: o.detach() for k, o in outs.items()})
    tensors.update({f"grad_{k}": u for k, u in upstream.items()})
    # grad_x sums both outputs' contributions; weight and bias only feed `out`.
    tensors.update({"grad_x": inputs["x"].grad, "grad_weight": inputs["weight"].grad})
    tensors["grad_bias"] = inputs["bias"].grad
    save(
        "layer_norm_trailing_dims",
        tensors,
        {"eps": str(eps), "normalized_shape": "4,5", "normalized_shape_plain": "3,4,5"},
    )


def batch_norm_module_step(bn, x):
    """One forward of `bn` on a fresh leaf copy of x and the gradients of
    (out * grad_out).sum() for x and the module's affine parameters."""
    x = leaf(x)
    out = bn(x)
    grad_out = randn(*out.shape)
    params = [p for p in (bn.weight, bn.bias) if p is not None]
    grads = torch.autograd.grad((out * grad_out).sum(), [x] + params)
    res = {"out": out, "grad_out": grad_out, "grad_x": grads[0]}
    if params:
        res["grad_weight"], res["grad_bias"] = grads[1], grads[2]
    return x, res


def batch_norm2d_momentum_none():
    """nn.BatchNorm2d(3, momentum=None): three training steps (the running
    statistics a cumulative average), then an eval forward."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=None)
    with torch.no_grad():
        bn.weight.copy_(1.0 + 0.3 * randn(3))
        bn.bias.copy_(0.2 * randn(3))
    tensors = {"weight": bn.weight, "bias": bn.bias}
    bn.train()
    for step in range(1, 4):
        x, res = batch_norm_module_step(bn, randn(2, 3, 4, 3) * (1.0 + step) + step)
        tensors[f"x_s{step}"] = x
        tensors.update({f"{k}_s{step}": v for k, v in res.items()})
        tensors[f"running_mean_s{step}"] = bn.running_mean.clone()
        tensors[f"running_var_s{step}"] = bn.running_var.clone()
    tensors["num_batches_tracked"] = bn.num_batches_tracked.clone()
    bn.eval()
    x, res = batch_norm_module_step(bn, randn(2, 3, 4, 3) * 2.0 + 1.0)
    tensors["x_eval"] = x
    tensors.update({f"{k}_eval": v for k, v in res.items()})
    save("batch_norm2d_momentum_none", tensors, {"eps": "1e-05", "momentum": "None", "steps": 3})


def batch_norm2d_untracked():
    """nn.BatchNorm2d(3, track_running_stats=False) in training and in eval
    (batch statistics both times), and nn.BatchNorm2d(3, momentum=0.3,
    affine=False) for one training step and an eval forward."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, track_running_stats=False)
    with torch.no_grad():
        bn.weight.copy_(1.0 + 0.3 * randn(3))
        bn.bias.copy_(0.2 * randn(3))
    tensors = {"weight": bn.weight, "bias": bn.bias}
    for mode in ("train", "eval"):
        bn.train(mode == "train")
        x, res = batch_norm_module_step(bn, randn(2, 3, 4, 3) * 1.5 + 0.5)
        tensors[f"x_{mode}"] = x
        tensors.update({f"{k}_{mode}": v for k, v in res.items()})
    plain = nn.BatchNorm2d(3, momentum=0.3, affine=False)
    for mode in ("train", "eval"):
        plain.train(mode == "train")
        x, res = batch_norm_module_step(plain, randn(2, 3, 4, 3) * 1.5 + 0.5)
        tensors[f"x_plain_{mode}"] = x
        tensors.update({f"{k}_plain_{mode}": v for k, v in res.items()})
    tensors["running_mean_plain"] = plain.running_mean
    tensors["running_var_plain"] = plain.running_var
    save("batch_norm2d_untracked", tensors, {"eps": "1e-05", "momentum_plain": "0.3"})


def embedding_padding_idx():
    """F.embedding with padding_idx 2 (ids name it three times) and with
    padding_idx -2 (row 5, named twice): that row gets no gradient."""
    torch.manual_seed(0)
    weight = leaf(randn(7, 5))
    ids = torch.tensor([[2, 4, 6, 2], [0, 2, 4, 3], [5, 1, 5, 6]], dtype=torch.int64)
    outs = {
        "out": F.embedding(ids, weight, padding_idx=2),
        "out_neg": F.embedding(ids, weight, padding_idx=-2),
    }
    upstream = {k: randn(*o.shape) for k, o in outs.items()}
    tensors = {"weight": weight, "ids": ids}
    for k, o in outs.items():
        (grad,) = torch.autograd.grad((o * upstream[k]).sum(), [weight])
        tensors[k] = o
        tensors["grad_" + k] = upstream[k]
        tensors["grad_weight" + k[3:]] = grad
    save("embedding_padding_idx", tensors, {"padding_idx": "2", "padding_idx_neg": "-2"})
# loss options: reduction='none', cross entropy's weight / ignore_index /
# label_smoothing / class dims, bce's weight / pos_weight / targets outside
# [0, 1], mse with a broadcasting target
# ---------------------------------------------------------------------------


def loss_case(case, fn, inputs, diff, constants, meta):
    """Save the differentiated `inputs`, the `constants` (targets, weights),
    the forward result and the gradients of `fn(**inputs)`."""
    res = forward_backward(fn, inputs, diff)
    save(case, {**inputs, **constants, **res}, meta)


def mse_none():
    torch.manual_seed(0)
    inputs = {"x": leaf(randn(3, 5)), "target": leaf(randn(3, 5))}
    loss_case(
        "mse_none",
        lambda x, target: F.mse_loss(x, target, reduction="none"),
        inputs, ["x", "target"], {}, {"reduction": "none"},
    )


def mse_broadcast_target():
    torch.manual_seed(0)
    inputs = {"x": leaf(randn(4, 3)), "target": leaf(randn(3))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the size-mismatch warning
        loss_case(
            "mse_broadcast_target",
            lambda x, target: F.mse_loss(x, target, reduction="mean"),
            inputs, ["x", "target"], {}, {"reduction": "mean"},
        )


def bce_with_logits_none():
    torch.manual_seed(0)
    inputs = {"x": leaf(randn(4, 6) * 2.0), "target": leaf(torch.rand(4, 6))}
    loss_case(
        "bce_with_logits_none",
        lambda x, target: F.binary_cross_entropy_with_logits(x, target, reduction="none"),
        inputs, ["x", "target"], {}, {"reduction": "none"},
    )


def bce_with_logits_weights():
    """weight (4, 1) and pos_weight (5) broadcast against x (4, 5); targets in [-0.5, 1.5]."""
    torch.manual_seed(0)
    inputs = {"x": leaf(randn(4, 5) * 2.0), "target": leaf(torch.rand(4, 5) * 2.0 - 0.5)}
    constants = {"weight": torch.rand(4, 1) + 0.5, "pos_weight": torch.rand(5) * 3.0 + 0.2}
    loss_case(
        "bce_with_logits_weights",
        lambda x, target: F.binary_cross_entropy_with_logits(
            x, target, weight=constants["weight"], pos_weight=constants["pos_weight"],
            reduction="mean"),
        inputs, ["x", "target"], constants, {"reduction": "mean"},
    )


def bce_with_logits_pos_weight_none():
    """pos_weight (3) against x (2, 4, 3), no reduction; targets in [-1, 2]."""
    torch.manual_seed(0)
    inputs = {"x": leaf(randn(2, 4, 3) * 2.0), "target": leaf(torch.rand(2, 4, 3) * 3.0 - 1.0)}
    constants = {"pos_weight": torch.tensor([0.5, 2.0, 4.0])}
    loss_case(
        "bce_with_logits_pos_weight_none",
        lambda x, target: F.binary_cross_entropy_with_logits(
            x, target, pos_weight=constants["pos_weight"], reduction="none"),
        inputs, ["x", "target"], constants, {"reduction": "none"},
    )


def cross_entropy_case(case, x_shape, target, reduction, weight=None, ignore_index=None,
                       label_smoothing=0.0):
    x = leaf(randn(*x_shape) * 2.0)
    constants = {"target": target}
    if weight is not None:
        constants["weight"] = weight
    kwargs = {"weight": weight, "reduction": reduction, "label_smoothing": label_smoothing}
    if ignore_index is not None:
        kwargs["ignore_index"] = ignore_index
    meta = {
        "reduction": reduction,
        "ignore_index": "none" if ignore_index is None else ignore_index,
        "label_smoothing": repr(label_smoothing),
    }
    loss_case(case, lambda x: F.cross_entropy(x, target, **kwargs), {"x": x}, ["x"], constants,
              meta)


def cross_entropy_none():
    torch.manual_seed(0)
    target = torch.randint(0, 5, (6,), dtype=torch.int64)
    cross_entropy_case("cross_entropy_none", (6, 5), target, "none")


def cross_entropy_class_dims():
    """Logits (N, C, d1, d2) = (2, 4, 3, 5), targets (2, 3, 5)."""
    torch.manual_seed(0)
    target = torch.randint(0, 4, (2, 3, 5), dtype=torch.int64)
    cross_entropy_case("cross_entropy_class_dims", (2, 4, 3, 5), target, "mean")


def cross_entropy_weight():
    torch.manual_seed(0)
    target = torch.randint(0, 5, (8,), dtype=torch.int64)
    weight = torch.rand(5) + 0.2
    cross_entropy_case("cross_entropy_weight", (8, 5), target, "mean", weight=weight)


def cross_entropy_ignore_index():
    torch.manual_seed(0)
    target = torch.tensor([0, 1, 3, 1, 2, 1, 3], dtype=torch.int64)
    cross_entropy_case("cross_entropy_ignore_index", (7, 4), target, "mean", ignore_index=1)


def cross_entropy_label_smoothing():
    torch.manual_seed(0)
    target = torch.randint(0, 5, (6,), dtype=torch.int64)
    cross_entropy_case("cross_entropy_label_smoothing", (6, 5), target, "mean",
                       label_smoothing=0.15)


def cross_entropy_all_options():
    """Class dims, weight, ignore_index and label smoothing together, mean."""
    torch.manual_seed(0)
    target = torch.tensor([[2, 0, 3, 2, 1], [1, 2, 2, 3, 0], [0, 3, 1, 2, 2]], dtype=torch.int64)
    weight = torch.rand(4) + 0.2
    cross_entropy_case("cross_entropy_all_options", (3, 4, 5), target, "mean", weight=weight,
                       ignore_index=2, label_smoothing=0.2)


def cross_entropy_all_options_none():
    """As cross_entropy_all_options, unreduced, with a different smoothing."""
    torch.manual_seed(0)
    target = torch.tensor([[2, 0, 3, 2, 1], [1, 2, 2, 3, 0], [0, 3, 1, 2, 2]], dtype=torch.int64)
    weight = torch.rand(4) + 0.2
    cross_entropy_case("cross_entropy_all_options_none", (3, 4, 5), target, "none",
                       weight=weight, ignore_index=2, label_smoothing=0.35)


def cross_entropy_unbatched():
    """Logits (C) = (6) against a 0-dim target, with weight and smoothing."""
    torch.manual_seed(0)
    target = torch.tensor(4, dtype=torch.int64)
    weight = torch.rand(6) + 0.2
    cross_entropy_case("cross_entropy_unbatched", (6,), target, "mean", weight=weight,
                       label_smoothing=0.1)


def gaussian_kl_none():
    """kiln's gaussian_kl per row: -1/2 sum_j (1 + logvar - mu^2 - e^logvar) over dims 1.."""
    torch.manual_seed(0)
    inputs = {"mu": leaf(randn(4, 2, 3)), "logvar": leaf(randn(4, 2, 3) * 0.5)}
    loss_case(
        "gaussian_kl_none",
        lambda mu, logvar: (-0.5 * (1 + logvar - mu**2 - logvar.exp())).sum(dim=(1, 2)),
        inputs, ["mu", "logvar"], {}, {"reduction": "none"},
    )
# optimiser options: Adam/AdamW amsgrad and maximize, SGD maximize
# ---------------------------------------------------------------------------


def adam_options_case(case, cls, amsgrad, maximize):
    # beta2 0.8 (not 0.999) lets a small gradient after a large one pull
    # exp_avg_sq below its running max within three steps, so AMSGrad's
    # max_exp_avg_sq differs from exp_avg_sq and is what divides the step.
    lr, beta1, beta2, eps, wd = 0.01, 0.9, 0.8, 1e-8, 0.1
    opt, pa, pb, tensors = run_optimizer(
        lambda ps: cls(
            ps,
            lr=lr,
            betas=(beta1, beta2),
            eps=eps,
            weight_decay=wd,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=False,
        )
    )
    for suffix, p in (("a", pa), ("b", pb)):
        st = opt.state[p]
        tensors[f"exp_avg_{suffix}"] = st["exp_avg"]
        tensors[f"exp_avg_sq_{suffix}"] = st["exp_avg_sq"]
        if amsgrad:
            tensors[f"max_exp_avg_sq_{suffix}"] = st["max_exp_avg_sq"]
    if amsgrad:
        lagging = sum(
            int((opt.state[p]["max_exp_avg_sq"] != opt.state[p]["exp_avg_sq"]).sum()) for p in (pa, pb)
        )
        assert lagging >= 3, f"{case}: only {lagging} elements where the max differs"
    meta = {
        "lr": str(lr),
        "beta1": str(beta1),
        "beta2": str(beta2),
        "eps": str(eps),
        "weight_decay": str(wd),
        "amsgrad": "true" if amsgrad else "false",
        "maximize": "true" if maximize else "false",
        "steps": str(STEPS),
    }
    save(case, tensors, meta)


def adam_amsgrad():
    adam_options_case("adam_amsgrad", torch.optim.Adam, amsgrad=True, maximize=False)


def adam_maximize():
    adam_options_case("adam_maximize", torch.optim.Adam, amsgrad=False, maximize=True)


def adamw_amsgrad_maximize():
    adam_options_case("adamw_amsgrad_maximize", torch.optim.AdamW, amsgrad=True, maximize=True)


def sgd_maximize():
    lr, momentum, wd = 0.1, 0.9, 0.01
    opt, pa, pb, tensors = run_optimizer(
        lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum, weight_decay=wd, maximize=True, foreach=False)
    )
    tensors["momentum_buffer_a"] = opt.state[pa]["momentum_buffer"]
    tensors["momentum_buffer_b"] = opt.state[pb]["momentum_buffer"]
    meta = {
        "lr": str(lr),
        "momentum": str(momentum),
        "dampening": "0.0",
        "nesterov": "false",
        "weight_decay": str(wd),
        "maximize": "true",
        "steps": str(STEPS),
    }
    save("sgd_maximize", tensors, meta)
# convolutions: groups, depthwise and padding="same"
# ---------------------------------------------------------------------------


def conv2d_groups_case(case, x_shape, w_shape, stride, padding, dilation, groups):
    """F.conv2d with bias and `groups`; `padding` is a pair or "same"/"valid"."""
    torch.manual_seed(0)
    inputs = {
        "x": leaf(randn(*x_shape)),
        "weight": leaf(randn(*w_shape) * 0.3),
        "bias": leaf(randn(w_shape[0]) * 0.1),
    }

    def fn(x, weight, bias):
        return F.conv2d(
            x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups
        )

    res = forward_backward(fn, inputs, ["x", "weight", "bias"])
    meta = {
        "stride": ints(*stride),
        "padding": padding if isinstance(padding, str) else ints(*padding),
        "dilation": ints(*dilation),
        "groups": groups,
        "bias": "true",
    }
    save(case, {**inputs, **res}, meta)


def conv2d_grouped():
    # C = 4, O = 6 in 2 groups: weight (6, 2, 3, 3).
    conv2d_groups_case("conv2d_grouped", (2, 4, 7, 6), (6, 2, 3, 3), (2, 2), (1, 1), (2, 1), 2)


def conv2d_depthwise():
    # groups = C = 3 with channel multiplier 2: weight (6, 1, 3, 3).
    conv2d_groups_case("conv2d_depthwise", (2, 3, 6, 5), (6, 1, 3, 3), (1, 1), (1, 1), (1, 1), 3)


def conv2d_same_asymmetric():
    # Even kernel height and dilated width 2 (dilation 3): both totals (3, 3)
    # are odd, so PyTorch pads one more row/column at the bottom/right.
    conv2d_groups_case("conv2d_same_asymmetric", (2, 3, 7, 6), (4, 3, 4, 2), (1, 1), "same", (1, 3), 1)


def conv_transpose2d_grouped():
    # Cin = 4 in 2 groups, Cout = 6: weight (4, 3, 3, 3), bias (6).
    torch.manual_seed(0)
    stride, padding, output_padding, dilation, groups = (2, 3), (1, 0), (1, 2), (1, 1), 2
    inputs = {
        "x": leaf(randn(2, 4, 4, 3)),
        "weight": leaf(randn(4, 3, 3, 3) * 0.3),
        "bias": leaf(randn(6) * 0.1),
    }

    def fn(x, weight, bias):
        return F.conv_transpose2d(
            x,
            weight,
            bias,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            groups=groups,
            dilation=dilation,
        )

    res = forward_backward(fn, inputs, ["x", "weight", "bias"])
    meta = {
        "stride": ints(*stride),
        "padding": ints(*padding),
        "output_padding": ints(*output_padding),
        "dilation": ints(*dilation),
        "groups": groups,
        "bias": "true",
    }
    save("conv_transpose2d_grouped", {**inputs, **res}, meta)
# scaled_dot_product_attention: lengths, head sizes, masks and scale
# ---------------------------------------------------------------------------


def sdpa_case(case, q_shape, k_shape, v_shape, mask=None, mask_grad=False, **kwargs):
    """F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs) with
    the gradients of q, k, v (and of a float mask when `mask_grad`)."""
    inputs = {"q": leaf(randn(*q_shape)), "k": leaf(randn(*k_shape)), "v": leaf(randn(*v_shape))}
    diff = ["q", "k", "v"]
    if mask is not None:
        inputs["mask"] = leaf(mask) if mask_grad else mask
        if mask_grad:
            diff.append("mask")

    def fn(q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)

    res = forward_backward(fn, inputs, diff)
    tensors = {**inputs, **res}
    if mask is not None and mask.dtype == torch.bool:
        tensors["mask"] = mask.to(torch.int64)  # safetensors goldens hold f32/i64 only
    meta = {k: repr(v) if isinstance(v, float) else str(v).lower() for k, v in kwargs.items()}
    save(case, tensors, meta)


def sdpa_cross_lengths():
    torch.manual_seed(0)
    # L = 3 queries over S = 5 keys, value head size 6 != E = 4; not causal.
    sdpa_case("sdpa_cross_lengths", (2, 3, 3, 4), (2, 3, 5, 4), (2, 3, 5, 6))


def sdpa_causal_short_query():
    torch.manual_seed(0)
    # L < S: top-left aligned triangle, query i sees keys 0..=i of 6.
    sdpa_case("sdpa_causal_short_query", (2, 2, 3, 4), (2, 2, 6, 4), (2, 2, 6, 3), is_causal=True)


def sdpa_causal_long_query():
    torch.manual_seed(0)
    # L > S: queries 2.. see every one of the 3 keys.
    sdpa_case("sdpa_causal_long_query", (2, 2, 5, 4), (2, 2, 3, 4), (2, 2, 3, 3), is_causal=True)


def sdpa_float_mask():
    torch.manual_seed(0)
    # A float mask broadcast over the heads, with its own gradient.
    mask = randn(2, 1, 4, 5)
    sdpa_case("sdpa_float_mask", (2, 3, 4, 4), (2, 3, 5, 4), (2, 3, 5, 3), mask=mask, mask_grad=True)


def sdpa_bool_mask():
    torch.manual_seed(0)
    # A boolean [L, S] mask; query row 2 sees no key (its output and gradients are 0).
    mask = torch.tensor(
        [[1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool
    )
    sdpa_case("sdpa_bool_mask", (2, 2, 4, 3), (2, 2, 5, 3), (2, 2, 5, 4), mask=mask)


def sdpa_scale_broadcast():
    torch.manual_seed(0)
    # An explicit scale, and k, v shared by the batch ([1, H, S, E] against [B, H, L, E]).
    sdpa_case("sdpa_scale_broadcast", (2, 3, 4, 4), (1, 3, 6, 4), (1, 3, 6, 5), scale=0.3)


CASES = [
    conv2d_a,
    conv2d_b,
    conv2d_dcgan,
    conv_transpose2d_a,
    conv_transpose2d_b,
    conv_transpose2d_c,
    batch_norm2d_train,
    batch_norm2d_eval,
    leaky_relu,
    gelu_none,
    gelu_tanh,
    layer_norm,
    softmax,
    log_softmax,
    softmax_dim0,
    log_softmax_dim1,
    cross_entropy,
    bce_with_logits,
    mse,
    attention,
    embedding,
    adam,
    adamw,
    sgd_momentum,
    state_dict_small,
    image_folder_transforms,
    matmul_vectors,
    layer_norm_trailing_dims,
    batch_norm2d_momentum_none,
    batch_norm2d_untracked,
    embedding_padding_idx,
    mse_none,
    mse_broadcast_target,
    bce_with_logits_none,
    bce_with_logits_weights,
    bce_with_logits_pos_weight_none,
    cross_entropy_none,
    cross_entropy_class_dims,
    cross_entropy_weight,
    cross_entropy_ignore_index,
    cross_entropy_label_smoothing,
    cross_entropy_all_options,
    cross_entropy_all_options_none,
    cross_entropy_unbatched,
    gaussian_kl_none,
    adam_amsgrad,
    adam_maximize,
    adamw_amsgrad_maximize,
    sgd_maximize,
    conv2d_grouped,
    conv2d_depthwise,
    conv2d_same_asymmetric,
    conv_transpose2d_grouped,
    sdpa_cross_lengths,
    sdpa_causal_short_query,
    sdpa_causal_long_query,
    sdpa_float_mask,
    sdpa_bool_mask,
    sdpa_scale_broadcast,
]


def verify():
    """Reload every file and print its keys, shapes, dtypes and metadata."""
    print()
    for name in sorted(os.listdir(DATA)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(DATA, name)
        size = os.path.getsize(path)
        assert size < 40 * 1024, f"{name} is too large ({size} bytes)"
        with safe_open(path, framework="pt") as f:
            print(f"{name} ({size} bytes) metadata={f.metadata()}")
            for key in f.keys():
                t = f.get_tensor(key)
                assert t.dtype in (torch.float32, torch.int64), (name, key, t.dtype)
                if t.is_floating_point():
                    assert torch.isfinite(t).all(), (name, key)
                assert t.numel() == 0 or t.abs().sum() > 0 or key.endswith("num_batches_tracked"), (
                    f"{name}:{key} is all zeros"
                )
                print(f"    {key:22s} {str(t.dtype):14s} {list(t.shape)}")


def main():
    os.makedirs(DATA, exist_ok=True)
    print(f"torch {torch.__version__}")
    for case in CASES:
        case()
    verify()


if __name__ == "__main__":
    main()
