"""Per-sample gradient quantities from ONE batched backward pass (docs/methods.md §2), never N × P.

Hooks store each supported layer's input (forward) and the gradient of its output (backward).
With the loss taken as the *sum* of per-sample losses, row ``i`` of an output gradient is sample
``i``'s own gradient, so every per-sample weight gradient factors as G_i = Σ_s b[i,s] a[i,s]ᵀ over
the layer's positions s (1 for a plain Linear, the tokens of a 3-D Linear input, the output
pixels of a Conv2d). Its squared norm is then taken per layer by whichever needs the fewest
multiply-adds (see :meth:`LayerCapture.variant`):

* the "ghost norm"  Σ_{s,t} (a_s·a_t)(b_s·b_t)   — cost ~ S²(d_in + d_out), no G_i at all;
* the explicit G_i = bᵀa, then ‖G_i‖²             — cost ~ S·d_in·d_out.

Conv2d gets two shortcuts: its explicit G_i comes from the convolution weight-gradient kernel
with the batch as groups (no unfolded patches), and for stride 1 the patch Gram a_s·a_t is summed
from the Gram of the padded pixels, about kh·kw times fewer multiply-adds than unfolding.

BatchNorm2d (eval mode only: with batch statistics the samples are not independent) has the
per-channel gradients Σ_s b·x̂ (weight) and Σ_s b (bias); it does not fit the outer-product form,
so :meth:`LayerCapture.factors` refuses it and :meth:`~LayerCapture.per_sample_sq_norm` /
:meth:`~LayerCapture.per_sample_grads` handle it directly.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InfluenceLensError
from engine.progress import Progress, no_progress
from engine.sources import batches
from engine.task import Task

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d, nn.BatchNorm2d)
# "ghost" / "explicit" pick the faster variant of that family; a variant name forces it where it
# applies: factors = from (a, b) (Conv2d: unfolded patches), pixels = Conv2d input Gram from the
# padded pixels, conv = Conv2d weight-gradient kernel with the batch as groups.
# Equal operation counts: the kernels that build no unfolded patches come first (less memory).
TIE_ORDER = ("explicit-conv", "ghost-pixels", "explicit-factors", "ghost-factors")
NORM_METHODS = ("auto", "ghost", "explicit", "ghost-factors", "ghost-pixels", "explicit-factors", "explicit-conv")

# Peak size (elements) of one intermediate (unfolded patches, Gram matrices, explicit gradients)
# while taking norms; the batch is cut into row chunks below it. 2^25 floats = 128 MiB in fp32.
DEFAULT_CHUNK_ELEMENTS = 2**25


class LayerCapture:
    """Context manager capturing layer inputs and output gradients for per-sample quantities.

    ``with LayerCapture(model) as cap:`` hooks every supported layer with trainable parameters
    (or exactly ``layers``); run a forward pass and a backward pass of the **summed** per-sample
    loss (``loss.backward()`` or ``torch.autograd.grad``; the weight gradients themselves are not
    needed, so differentiating with respect to the input alone is enough and cheaper), then ask
    for :meth:`factors`, :meth:`per_sample_sq_norm`, :meth:`per_sample_grads`. A layer called
    several times in one forward (weight sharing) has its positions concatenated: the per-sample
    gradient is the sum over calls. A forward pass after a completed backward pass replaces
    what was stored; call :meth:`clear` to drop a batch whose backward pass never ran.

    ``norm_method`` (one of ``NORM_METHODS``) forces a family or a variant for every layer (tests,
    benchmarks); ``auto`` picks the fastest per layer.
    """

    def __init__(self, model: nn.Module, layers: Iterable[nn.Module] | None = None, *,
                 norm_method: str = "auto", chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        if norm_method not in NORM_METHODS:
            raise ValueError(f"unknown norm_method {norm_method!r}; valid choices: {', '.join(NORM_METHODS)}")
        self.layers = list(layers) if layers is not None else trainable_layers(model)
        for layer in self.layers:
            _check_supported(layer)
        self.norm_method = norm_method
        self.chunk_elements = chunk_elements
        self._inputs: dict[nn.Module, list[torch.Tensor]] = {}
        self._grads: dict[nn.Module, list[torch.Tensor | None]] = {}
        self._handles: list = []

    def __enter__(self) -> LayerCapture:
        for layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._forward_pre_hook))
            self._handles.append(layer.register_forward_hook(self._forward_hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        """Drop the stored tensors (they hold a batch's activations)."""
        self._inputs.clear()
        self._grads.clear()

    # ---- hooks ------------------------------------------------------------------------------
    def _forward_pre_hook(self, module: nn.Module, inputs: tuple) -> None:
        if not torch.is_grad_enabled():
            return
        if isinstance(module, nn.BatchNorm2d) and (module.training or not module.track_running_stats):
            raise InfluenceLensError(f"{type(module).__name__} normalizes with batch statistics here, which mixes "
                                     "samples: per-sample gradients need the model in eval mode (model.eval()) "
                                     "with running statistics")
        if self._inputs.get(module) and all(g is not None for g in self._grads[module]):
            # Everything from the previous forward/backward is complete: this is a new batch.
            self._inputs[module], self._grads[module] = [], []

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        calls = self._inputs.setdefault(module, [])
        grads = self._grads.setdefault(module, [])
        call = len(calls)
        calls.append(inputs[0].detach())
        grads.append(None)

        def store(grad: torch.Tensor) -> None:
            grads[call] = grad.detach()

        # A tensor hook registered before any in-place op that follows (ReLU(inplace=True))
        # still receives the gradient of this very output.
        output.register_hook(store)

    # ---- public quantities --------------------------------------------------------------------
    def batch_size(self, module: nn.Module) -> int:
        return self._stored(module)[0][0].shape[0]

    def factors(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` of shapes (B, S, d_in) and (B, S, d_out) with G_i = Σ_s b[i,s] a[i,s]ᵀ.

        ``a`` carries a trailing column of ones when the layer has a bias, so the bias gradient
        is the last column of G. Conv2d: ``a`` are the unfolded input patches (weight flattened
        as (out, in·kh·kw)), ``b`` the output gradients per output pixel. Not for BatchNorm2d.
        """
        if isinstance(module, nn.BatchNorm2d):
            raise TypeError("BatchNorm2d gradients are per-channel, not an outer product; use "
                            "per_sample_sq_norm or per_sample_grads for it")
        return self._factors(module, slice(None))

    def per_sample_grads(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Each parameter's per-sample gradient, ``{name: (B, *param.shape)}``. Materializes
        B × (layer size): meant for one batch of one layer, not for scoring."""
        if isinstance(module, (nn.BatchNorm2d, nn.Conv2d)):
            return self._explicit_grads(module, slice(None))
        a, b = self.factors(module)
        g = torch.bmm(b.transpose(1, 2), a)
        out = {"weight": g[:, :, :module.in_features]}
        if module.bias is not None:
            out["bias"] = g[:, :, -1]
        return out

    def per_sample_sq_norm(self, module: nn.Module) -> torch.Tensor:
        """(B,) squared Frobenius norm of each sample's gradient over all the layer's parameters."""
        n, variant = self.batch_size(module), self.variant(module)
        step = max(1, self.chunk_elements // max(1, self._elements_per_row(module, variant)))
        return torch.cat([self._sq_norm(module, slice(lo, min(lo + step, n)), variant) for lo in range(0, n, step)])

    def path(self, module: nn.Module) -> str:
        """``ghost`` or ``explicit``: the family of :meth:`variant` (BatchNorm2d: ``explicit``)."""
        return self.variant(module).split("-")[0]

    def variant(self, module: nn.Module) -> str:
        """The implementation :meth:`per_sample_sq_norm` uses for this layer (see ``NORM_METHODS``).

        ``auto`` takes the variant with the fewest multiply-adds (ties: ``TIE_ORDER``). A rule, not a
        timing: the variants round differently, and a choice by run-time timing made the same command
        give scores differing in the 5th digit from one run to the next.
        """
        if isinstance(module, nn.BatchNorm2d):
            return "explicit-batchnorm"
        costs = self._candidates(module)
        return min(costs, key=lambda name: (costs[name], TIE_ORDER.index(name)))

    def total_sq_norm(self) -> torch.Tensor:
        """(B,) squared gradient norm over every captured layer that took part in the pass."""
        used = [layer for layer in self.layers if self._inputs.get(layer)]
        if not used:
            raise RuntimeError("no captured layer took part in a forward pass with gradients enabled")
        return torch.stack([self.per_sample_sq_norm(layer) for layer in used]).sum(0)

    # ---- internals ----------------------------------------------------------------------------
    def _stored(self, module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        inputs, grads = self._inputs.get(module), self._grads.get(module)
        if not inputs:
            raise RuntimeError(f"nothing captured for {module}: run a forward pass inside the "
                               "LayerCapture with gradients enabled")
        if any(g is None for g in grads):
            raise RuntimeError(f"no output gradient captured for {module}: call backward on the summed loss")
        return inputs, grads

    def _shape(self, module: nn.Module) -> tuple[int, int, int]:
        """(positions S, d_in with bias column, d_out) of a Linear or Conv2d, summed over calls."""
        inputs, grads = self._stored(module)
        s = sum(g[0].numel() // module.weight.shape[0] for g in grads)
        d_in = module.weight[0].numel() + (module.bias is not None)
        return s, d_in, module.weight.shape[0]

    def _costs(self, module: nn.Module) -> dict[str, int]:
        """Per-sample multiply-adds of every variant that applies to this Linear or Conv2d."""
        s, d_in, d_out = self._shape(module)
        costs = {"ghost-factors": s * s * (d_in + d_out), "explicit-factors": s * d_in * d_out}
        inputs = self._stored(module)[0]
        if isinstance(module, nn.Conv2d):
            costs["explicit-conv"] = s * d_in * d_out
            if len(inputs) == 1:  # cross-call pixel pairs would be missing from a per-call pixel Gram
                pixels = _padded_pixels(module, inputs[0].shape)
                kernel = module.weight[0, 0].numel()
                costs["ghost-pixels"] = pixels * pixels * module.in_channels + s * s * (d_out + kernel)
        return costs

    def _candidates(self, module: nn.Module) -> dict[str, int]:
        """The variants ``norm_method`` allows for this layer, with their multiply-adds."""
        costs = self._costs(module)
        if self.norm_method in costs:
            return {self.norm_method: costs[self.norm_method]}
        family = self.norm_method.split("-")[0]
        if family != "auto":  # a family, or a variant that does not apply here: its family
            costs = {k: v for k, v in costs.items() if k.startswith(family)}
        return costs

    def _elements_per_row(self, module: nn.Module, variant: str) -> int:
        """The largest intermediate of one row: the chunk size is set from it."""
        if variant == "explicit-batchnorm":
            return 2 * self._stored(module)[0][0][0].numel()
        s, d_in, d_out = self._shape(module)
        if variant == "ghost-pixels":
            return _padded_pixels(module, self._stored(module)[0][0].shape) ** 2
        if variant == "ghost-factors":
            return max(s * s, s * (d_in + d_out))
        return max(d_in * d_out, s * (d_in + d_out))

    def _factors(self, module: nn.Module, rows: slice, *, bias_column: bool = True):
        inputs, grads = self._stored(module)
        a_parts, b_parts = [], []
        for x, g in zip(inputs, grads, strict=True):
            x, g = x[rows], g[rows]
            if isinstance(module, nn.Conv2d):
                a = _unfold(module, x).transpose(1, 2)
                b = g.flatten(2).transpose(1, 2)
            else:
                a, b = x.reshape(len(x), -1, x.shape[-1]), g.reshape(len(g), -1, g.shape[-1])
            if bias_column and module.bias is not None:
                a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
            a_parts.append(a)
            b_parts.append(b)
        if len(a_parts) == 1:
            return a_parts[0], b_parts[0]
        return torch.cat(a_parts, dim=1), torch.cat(b_parts, dim=1)

    def _explicit_grads(self, module: nn.Module, rows: slice) -> dict[str, torch.Tensor]:
        """Per-sample gradients of the rows, summed over the layer's calls (BatchNorm2d, Conv2d)."""
        inputs, grads = self._stored(module)
        out: dict[str, torch.Tensor] = {}
        for x, g in zip(inputs, grads, strict=True):
            for name, value in _call_grads(module, x[rows], g[rows]).items():
                out[name] = out[name] + value if name in out else value
        return out

    def _sq_norm(self, module: nn.Module, rows: slice, variant: str) -> torch.Tensor:
        if variant in ("explicit-batchnorm", "explicit-conv"):
            return sum(value.flatten(1).square().sum(1) for value in self._explicit_grads(module, rows).values())
        if variant == "explicit-factors":
            a, b = self._factors(module, rows)
            return torch.bmm(b.transpose(1, 2), a).square().sum((1, 2))
        if variant == "ghost-pixels":
            gram = _pixel_input_gram(module, self._stored(module)[0][0][rows])
            b = self._stored(module)[1][0][rows].flatten(2).transpose(1, 2)
        else:
            a, b = self._factors(module, rows, bias_column=False)
            if a.shape[1] == 1:
                return (a.square().sum((1, 2)) + (module.bias is not None)) * b.square().sum((1, 2))
            gram = torch.bmm(a, a.transpose(1, 2))
        if module.bias is not None:
            gram += 1  # the bias column of ones adds 1 to every a_s·a_t
        return gram.mul_(torch.bmm(b, b.transpose(1, 2))).sum((1, 2))


def _call_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """One call's per-sample parameter gradients from its input ``x`` and output gradient ``g``."""
    if isinstance(module, nn.BatchNorm2d):
        shape = (1, -1, 1, 1)
        scale = torch.rsqrt(module.running_var + module.eps)
        centered = (x - module.running_mean.view(shape)).mul_(g)
        return {"weight": centered.sum((2, 3)) * scale, "bias": g.sum((2, 3))}
    if isinstance(module, nn.Conv2d):
        # The batch as convolution groups: the weight-gradient kernel then keeps samples apart,
        # much faster than unfolding the patches (im2col) and a batched matmul.
        n, c_out = g.shape[:2]
        x, padding = _padded(module, x)
        weight = torch.nn.grad.conv2d_weight(x.reshape(1, -1, *x.shape[2:]), (n * c_out, *module.weight.shape[1:]),
                                             g.reshape(1, -1, *g.shape[2:]), stride=module.stride, padding=padding,
                                             dilation=module.dilation, groups=n)
        out = {"weight": weight.view(n, *module.weight.shape)}
        if module.bias is not None:
            out["bias"] = g.sum((2, 3))
        return out
    x, g = x.reshape(len(x), -1, x.shape[-1]), g.reshape(len(g), -1, g.shape[-1])
    out = {"weight": torch.bmm(g.transpose(1, 2), x)}
    if module.bias is not None:
        out["bias"] = g.sum(1)
    return out


def _padded(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | int]:
    """The input padded by hand when the convolution's own zero padding cannot express it."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), 0
    return x, conv.padding


def _padded_pixels(conv: nn.Conv2d, input_shape: torch.Size) -> int:
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    return (input_shape[2] + top + bottom) * (input_shape[3] + left + right)


def _pixel_input_gram(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(B, S, S) patch Gram a_s·a_t of a Conv2d without unfolding: the Gram of the padded pixels,
    then for each kernel offset the block of pixel pairs that this offset puts in patches s, t."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    n, _, height, width = x.shape
    flat = x.flatten(2)
    pixels = torch.bmm(flat.transpose(1, 2), flat).view(n, height, width, height, width)
    (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
    out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    gram = x.new_zeros(n, out_h, out_w, out_h, out_w)
    for i in range(kh):
        for j in range(kw):
            r = slice(i * dh, i * dh + sh * (out_h - 1) + 1, sh)
            c = slice(j * dw, j * dw + sw * (out_w - 1) + 1, sw)
            gram += pixels[:, r, c, r, c]
    return gram.view(n, out_h * out_w, out_h * out_w)


def _unfold(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Input patches (B, C_in·kh·kw, L) in the weight's flattening order."""
    x, padding = _padded(conv, x)
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)


def _check_supported(layer: nn.Module) -> None:
    if not isinstance(layer, SUPPORTED_LAYERS):
        names = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
        raise InfluenceLensError(f"per-sample gradients support {names} layers, not {type(layer).__name__}")
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        raise InfluenceLensError(f"per-sample gradients support Conv2d with groups=1 only, not groups={layer.groups} "
                                 f"({layer})")


def trainable_layers(model: nn.Module) -> list[nn.Module]:
    """The modules owning trainable parameters, all of which must be supported layers.

    Raises :class:`InfluenceLensError` naming the first module with trainable parameters of an
    unsupported type (its gradient would otherwise be silently left out of every norm), or a
    supported layer frozen only in part (its norm would count the frozen parameter).
    """
    layers = []
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        trainable = [p.requires_grad for p in params]
        if not any(trainable):
            continue
        if not isinstance(module, SUPPORTED_LAYERS):
            raise InfluenceLensError(f"module {name or type(module).__name__!r} ({type(module).__name__}) has "
                                     "trainable parameters, but per-sample gradients support only "
                                     f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)}; freeze it or replace it")
        if not all(trainable):
            raise InfluenceLensError(f"layer {name!r} is only partly frozen; freeze all or none of its parameters")
        layers.append(module)
    return layers


def per_sample_grad_sq_norms(model: nn.Module, task: Task, images: np.ndarray, labels: np.ndarray,
                             device: torch.device | str, *, batch_size: int = 256,
                             norm_method: str = "auto", progress: Progress = no_progress) -> np.ndarray:
    """‖∇θ ℓ(z_i, θ)‖² for every row, over all trainable parameters, as float64 (N,).

    The model runs in eval mode (BatchNorm with running statistics); its train/eval mode is
    restored afterwards. Every trainable parameter must sit in a supported layer (Linear,
    Conv2d, BatchNorm2d), else :class:`InfluenceLensError` (see :func:`trainable_layers`): all
    trainable parameters are counted, none silently skipped. Frozen layers are not counted.
    One forward and one input-only backward pass per batch: the weight gradients are never formed
    by autograd, only per layer and per chunk by the cheaper of the ghost and explicit paths.
    """
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    was_training = model.training
    model.eval()
    out = np.empty(len(images), dtype=np.float64)
    try:
        with LayerCapture(model, norm_method=norm_method) as capture:
            for positions, batch in batches(images, batch_size=batch_size):
                lo, hi = int(positions[0]), int(positions[-1]) + 1
                x = task.inputs(batch, device).requires_grad_(True)
                y = torch.as_tensor(labels[lo:hi], device=device)
                loss = task.loss(model(x), y, reduction="sum")
                torch.autograd.grad(loss, x)
                out[lo:hi] = capture.total_sq_norm().double().cpu().numpy()
                capture.clear()
                progress(hi, len(images), "per-sample gradients")
    finally:
        model.train(was_training)
    return out
