"""The invertible circular convolution layer."""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_image, check_parameters
from ..core import fourier
from ..core.circular import circular_conv2d, circular_pad, circular_pad_adjoint
from ..core.threads import safe_factorization_threads
from .base import InvertibleModule, at_boundary


def well_conditioned_weight(channels: int, kernel_size: int, scale: float = 0.1, generator=None) -> torch.Tensor:
    r"""A random orthogonal matrix at the centre tap plus a small random kernel.

    Every Fourier block is then :math:`A_f = Q + E_f` with :math:`Q` orthogonal and
    :math:`E_f = \sum_a \varepsilon_a e^{i\theta_a}`; with i.i.d. entries of variance
    :math:`s^2 / (c k^2)`, :math:`\|E_f\|_2 \approx 2s`, so every singular value of :math:`A_f` lies
    in about :math:`[1 - 2s, 1 + 2s]` and the per-frequency condition number is about
    :math:`(1+2s)/(1-2s)`, 1.5 for the default :math:`s = 0.1`, at every image size. torch's default
    ``nn.Conv2d`` initialisation, which the paper's code used, gives condition numbers around 1e3
    and up to 1e4 instead (reproduction notes), which costs about four digits in a float32 inverse.
    The orthogonal centre mixes the channels from the start, as Glow's 1x1 convs do.
    """
    q, r = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed orthogonal
    noise = torch.randn(channels, channels, kernel_size, kernel_size, generator=generator, dtype=torch.float64)
    weight = noise * (scale / math.sqrt(channels * kernel_size**2))
    weight[:, :, kernel_size // 2, kernel_size // 2] += q
    return weight.float()


_shared = threading.local()  # .table: {(id(conv), (h, w)): log-determinant} inside shared_logabsdets


@contextlib.contextmanager
def shared_logabsdets(convs: Iterable[tuple["InvertibleConv2d", tuple[int, int]]]):
    """Compute the log-determinants of many convs together, for the forward passes run inside the block.

    ``convs`` lists ``(conv, (h, w))``: each :class:`InvertibleConv2d` with the image size it will
    see (:meth:`iconv.models.FlowModel.convs` gives them for a flow). When gradients are on, the
    convs of one shape (channels, kernel, size, backend, dtype, device) get their exact
    log-determinants from one :func:`iconv.fourier.logabsdets` call, values and gradients equal
    bit for bit to separate calls; inside the block, a listed conv's ``forward`` at its listed
    size takes its value from there. Without gradients nothing is computed: each conv then
    reuses its cached factorization. A flow's forward wraps its layers in this block: ConvFlow's
    18 convs become 3 factorizations per training step, which took the step from 1.38 to 1.14
    Glow-baseline steps (Fashion-MNIST shape, batch 64, one thread, medians of 40 interleaved
    rounds; 1.49 to 1.19 on two threads).
    """
    if not torch.is_grad_enabled():
        yield
        return
    groups: dict[tuple, dict] = {}
    for conv, size in convs:
        if conv.weight.requires_grad:
            w = conv.weight
            key = (conv.channels, conv.kernel_size, tuple(size), conv.backend, w.dtype, w.device)
            groups.setdefault(key, {})[id(conv)] = conv  # a conv listed twice at one size counts once
    table = {}
    for (_, _, size, backend, _, _), members in groups.items():
        weights = torch.stack([conv.weight for conv in members.values()])  # (G, c, c, k, k)
        values = fourier.logabsdets(weights, *size, backend, validate=False)  # (G,)
        table.update({(key, size): value for key, value in zip(members, values.unbind())})
    previous = getattr(_shared, "table", None)
    _shared.table = table
    try:
        yield
    finally:
        _shared.table = previous


_CONVOLUTION_BACKWARD = torch.ops.aten.convolution_backward.default

#: Up to this many channels the input gradient of a circular conv on the CPU is computed as a
#: forward conv (see :class:`_CircularConv2d`); above it, by oneDNN's backward-data kernel.
FORWARD_ROUTE_MAX_CHANNELS = 12


class _CircularConv2d(torch.autograd.Function):
    r""":func:`~iconv.core.circular.circular_conv2d` with a backward chosen for small channel counts.

    **Memory.** It saves ``x``, not its padded copy, which is :math:`(1 + 2p/h)(1 + 2p/w)` times
    larger (1.31x at 14x14, 1.65x at 7x7) and would be kept until the backward; the backward pads
    ``x`` again and frees it at once. In a flow the input is the previous activation's output, which
    that layer saves anyway, so the conv holds no memory of its own. The padding is one ``F.pad``:
    two ``cat`` of edge slices were faster only while autograd differentiated the padding (here it
    never does; ConvFlow's step 1.08 -> 1.02 Glow-baseline steps on one thread, 1.18 -> 1.14 on
    two, medians of 40 interleaved rounds).

    **Input gradient.** The adjoint of a circular cross-correlation with taps :math:`W_{oc}[a]` is
    the circular cross-correlation with the taps :math:`W_{co}[-a]` (channels swapped, kernel
    flipped), so :math:`\bar x` is one *forward* conv of the padded output gradient. On the CPU,
    for few channels, that beats oneDNN's backward-data kernel by far (batch 64, one thread,
    medians of 50 interleaved rounds: 0.18 against 0.58 ms at c = 4, 14x14; 0.12 against 0.19 ms at
    c = 8, 7x7; 0.51 against 0.67 ms at c = 12, 16x16), and loses for many (0.55 against 0.33 ms at
    c = 16, 16x16, batch 32; 24 against 19 ms at c = 64, 32x32): it is used up to
    :data:`FORWARD_ROUTE_MAX_CHANNELS` channels on the CPU, oneDNN's kernel (with the padding's
    adjoint, :func:`~iconv.core.circular.circular_pad_adjoint`) otherwise and on CUDA. In
    ConvFlow's training step (as above, 40 interleaved rounds) this class took the step from 1.14
    to 1.04 Glow-baseline steps on one thread (1.19 to 1.15 on two) and its peak memory from 1.05
    to 0.97 of the baseline's. The weight gradient is the backward-weights kernel, the bias
    gradient a sum. Gradients agree with autograd through the
    padded conv to rounding (tests/test_conv.py: float64 against autograd and ``gradcheck``).
    With ``create_graph=True`` the backward is rebuilt from differentiable operations, so higher
    derivatives stay right.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return circular_conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        p = weight.shape[-1] // 2
        need_x, need_weight, need_bias = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiate the forward again, with a graph
            inputs = [t for t, need in zip((x, weight, bias), ctx.needs_input_grad) if need]
            grads = iter(torch.autograd.grad(circular_conv2d(x, weight, bias), inputs, grad, create_graph=True))
            return tuple(next(grads) if need else None for need in ctx.needs_input_grad)
        grad = grad.contiguous()
        grad_x = grad_weight = None
        forward_route = x.device.type == "cpu" and weight.shape[0] <= FORWARD_ROUTE_MAX_CHANNELS
        if need_x and forward_route:
            grad_x = F.conv2d(circular_pad(grad, p), weight.transpose(0, 1).flip(2, 3))
        if need_weight or (need_x and not forward_route):
            grad_padded, grad_weight, _ = _CONVOLUTION_BACKWARD(
                grad, circular_pad(x, p), weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [need_x and not forward_route, need_weight, False])
            if need_x and not forward_route:
                grad_x = circular_pad_adjoint(grad_padded, p)
        grad_bias = grad.sum((0, 2, 3)) if need_bias else None
        return grad_x, grad_weight, grad_bias


def circular_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The circular conv of ``x`` ``(B, c, h, w)``: spatial when the kernel fits the image, else Fourier.

    The values of :func:`iconv.circular.circular_conv2d` (it computes them), with no padding at all
    for ``k = 1`` and, when a gradient is needed, the backward of :class:`_CircularConv2d` (its
    input saved, not the padded copy; the input gradient as a forward conv for few channels).
    """
    p = weight.shape[-1] // 2
    if p == 0:
        return F.conv2d(x, weight, bias)
    if p <= min(x.shape[-2:]):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _CircularConv2d.apply(x, weight, bias)
        return circular_conv2d(x, weight, bias)  # (B, C, H, W)
    return fourier.conv2d(x, weight, bias, validate=False)


class InvertibleConv2d(InvertibleModule):
    r"""A ``channels -> channels`` circular convolution with exact inverse and log-determinant.

    ``forward(x) -> (y, logabsdet)`` with ``logabsdet`` of shape ``(B,)`` (the same for every
    sample: :math:`\sum_f \log|\det A_f|`, equation (2) of Finzi et al., 2019), and
    ``inverse(y) -> x`` (equation (1)). The factorization of the spectrum is cached and reused while
    the weight, the image size, dtype and device are unchanged and no gradient is needed, so
    repeated inverses cost about one forward.

    ``backend`` is ``"complex"`` (torch's complex LU) or ``"lifted"`` (the paper's real ``2c x 2c``
    lift). ``max_condition`` (default: :func:`iconv.fourier.condition_limit` of the dtype) is the
    largest per-frequency condition number ``inverse`` accepts before raising
    :class:`iconv.NotInvertibleError`. See :func:`well_conditioned_weight` for the initialisation.
    """

    def __init__(self, channels: int, kernel_size: int = 3, bias: bool = True, backend: str = "complex",
                 init_scale: float = 0.1, max_condition: float | None = None):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        fourier.check_backend(backend)
        self.channels, self.kernel_size, self.backend = channels, kernel_size, backend
        self.weight = nn.Parameter(well_conditioned_weight(channels, kernel_size, init_scale))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.max_condition = max_condition
        self._cache: tuple | None = None  # (key, factorization holding a copy of its weight)
        self.last_size: tuple[int, int] | None = None

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}, backend={self.backend!r}"

    def _no_grad_needed(self) -> bool:
        return not (torch.is_grad_enabled() and self.weight.requires_grad)

    def factorization(self, h: int, w: int) -> fourier.SpectralFactorization:
        """The spectrum's factorization for ``h x w`` images, from the cache when still valid.

        The cache is checked against a copy of the weight (one comparison of ``c^2 k^2`` numbers),
        so any change, even one that bypasses autograd's version counter, invalidates it.
        """
        if not self._no_grad_needed():
            return fourier.factorize(self.weight, h, w, self.backend, validate=False)
        key = (h, w, self.backend, self.weight.dtype, self.weight.device)
        if self._cache is not None:
            cached_key, fact = self._cache
            if cached_key == key and fact.matches(self.weight):
                return fact
        with torch.no_grad():
            fact = fourier.factorize(self.weight, h, w, self.backend, explicit=True, validate=False)
        self._cache = (key, fact)
        return fact

    def logabsdet(self, h: int, w: int) -> torch.Tensor:
        """Exact ``log|det|`` of this conv on ``h x w`` images (0-dim)."""
        if self._no_grad_needed():
            return self.factorization(h, w).logabsdet
        shared = getattr(_shared, "table", None)
        if shared:  # computed with the flow's other convs of this shape (shared_logabsdets)
            value = shared.get((id(self), (h, w)))
            if value is not None:
                return value
        return fourier.logabsdet(self.weight, h, w, self.backend, validate=False)

    def _check(self, x: torch.Tensor, name: str) -> None:
        """At the boundary: ``x`` a finite ``(B, channels, H, W)`` tensor of the weight's dtype, finite parameters."""
        if at_boundary():
            check_image(x, name, channels=self.channels, dtype=self.weight.dtype)  # (B, C, H, W)
            check_parameters(self)

    def forward(self, x: torch.Tensor):
        self._check(x, "x")
        h, w = x.shape[-2:]
        self.last_size = (h, w)
        return self.conv(x), self.logabsdet(h, w).to(x.dtype).expand(x.shape[0])

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x, "x")
        self.last_size = tuple(x.shape[-2:])
        return self.conv(x)

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        """The circular conv alone, without the log-determinant (:func:`circular_conv`)."""
        return circular_conv(x, self.weight, self.bias)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y, "y")
        h, w = y.shape[-2:]
        return fourier.inverse(y, self.weight, self.bias, self.backend, self.factorization(h, w), self.max_condition,
                               validate=False)

    @torch.no_grad()
    def condition_numbers(self, h: int | None = None, w: int | None = None) -> torch.Tensor:
        """Per-frequency condition numbers :func:`iconv.fourier.condition_numbers`: ``(h, w // 2 + 1)``.

        ``h, w`` default to the size of the last input seen.
        """
        h, w = self._size(h, w)
        return fourier.condition_numbers(self.weight.detach(), h, w, self.backend)

    @torch.no_grad()
    def singular_values(self, h: int | None = None, w: int | None = None) -> torch.Tensor:
        """Singular values of every Fourier block: ``(h, w // 2 + 1, c)``, descending."""
        h, w = self._size(h, w)
        blocks = fourier.spectrum(self.weight, h, w)
        with safe_factorization_threads(blocks):
            return torch.linalg.svdvals(blocks)

    def condition_number(self, h: int | None = None, w: int | None = None) -> torch.Tensor:
        """The worst per-frequency condition number, :math:`\\max_f \\kappa(A_f)` (0-dim); see :meth:`condition_numbers`."""
        return self.condition_numbers(h, w).max()

    def _size(self, h, w):
        if h is None or w is None:
            if self.last_size is None:
                raise ValueError("give the image size (h, w): the layer has not seen an input yet")
            return self.last_size
        return h, w
