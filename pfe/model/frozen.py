"""The main branch as stage II runs it: frozen, so an inference copy can stand in for it.

In stage II the main branch is a fixed function (eval-mode BatchNorm, no gradient). Its training
forward (the floor of a stage-II step) can then skip work that the checkpointed modules would do on
every step. ``runtime.frozen_main`` picks how much:

- ``modules``: run the checkpointed modules as they are;
- ``folded``: an inference copy with every BatchNorm that follows a convolution folded into
  it (``torch.fx.experimental.optimization.fuse``: w' = w * gamma / sqrt(var + eps),
  b' = (b - mean) * gamma / sqrt(var + eps) + beta) and the weights stored in the autocast dtype, so
  autocast does not cast them on every step: one pass over each activation and ~70 kernels fewer.
  Its 1x1 convs (two thirds of ResNet50's) run as one GEMM on the NHWC view, with the folded bias and a
  following ReLU in cuBLASLt's epilogue (:class:`PointwiseConv`): cuDNN adds a conv's bias in a separate
  broadcast pass, which took 3.1 of stage II's 19.7 ms of device time on an H200;
- ``fused``: the folded copy with conv -> ReLU and conv -> (+ shortcut) -> ReLU as single cuDNN
  kernels (``torch.cudnn_convolution_relu`` / ``cudnn_convolution_add_relu``) on a GPU, two more passes
  fewer per residual block. On its first GPU batch it is checked against the folded copy; if cuDNN has
  no such kernel for this dtype or the maps differ, it warns and stays ``folded``. On a CPU it computes
  exactly what ``folded`` does;
- ``auto`` (the config's default, resolved by :func:`pfe.model.frozen_main_mode`): ``fused`` when the
  training step is replayed from a CUDA graph, else ``folded``: fastest each way on an H200.

With ``runtime.compile`` (``PFENet.compile_blocks``), the copy's attention blocks (``regions``: they stay
modules in the copy, compiled on their own) or the whole copy (``all``) go through torch.compile.

:class:`FrozenMainBranch` keeps the copy and rebuilds it whenever what it was made from changes: the
device, the dtype, the autocast dtype, or any weight or BN statistic (through the tensors' in-place
version counters, which ``load_state_dict`` and every in-place update bump). The copy lives outside
the module tree: it is never saved, moved or counted with the model.
"""

from __future__ import annotations

import operator
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.experimental.optimization import fuse

from pfe.model.attention import ATTENTION_BLOCKS

FROZEN_MAIN = ("modules", "folded", "fused")
# Inductor settings for what pfe compiles. Static shapes: a training step has one batch shape, and the four
# attention blocks (one code object, four sizes) would otherwise turn dynamic after the first. 1x1 convs as
# matrix products on the NHWC view: faster than cuDNN's with the bias on an H200 (PointwiseConv below).
COMPILE_OPTIONS: dict = {"dynamic": False, "options": {"conv_1x1_as_mm": True}}
RECOMPILE_LIMIT = 64
# runtime.autotune: how long Inductor searches for faster kernels (compile time; results equal up to rounding).
# coordinate_descent tunes the block sizes of Inductor's own Triton kernels (TSAM's gates, BN, ReLU, adds);
# max_autotune_gemm also benchmarks Triton GEMM templates against cuBLAS for the matrix products (the 1x1 convs,
# TSAM's skinny C -> C/16 -> C ones among them), whose epilogues can take the pointwise work that follows, and
# leaves the 3x3 and 7x7 convs to cuDNN; max_autotune benchmarks Triton conv templates too (the options of
# torch.compile's mode="max-autotune-no-cudagraphs"), for many more minutes of compiling.
_CONV_BACKENDS_ATEN = {
    f"max_autotune_conv{part}_backends": "ATEN" for part in ("", "_bwd_weight", "_bwd_input")
}  # the backward ones exist in newer releases only
AUTOTUNE_OPTIONS: dict[str, dict[str, bool | str]] = {
    "off": {},
    "coordinate_descent": {"coordinate_descent_tuning": True},
    "max_autotune_gemm": {"max_autotune_gemm": True, "coordinate_descent_tuning": True, **_CONV_BACKENDS_ATEN},
    "max_autotune": {"max_autotune": True, "coordinate_descent_tuning": True},
}


def compiled(fn, autotune: str = "off"):  # noqa: ANN001, ANN201 (a module or a function, returned compiled)
    """``torch.compile(fn)`` with :data:`COMPILE_OPTIONS` and ``autotune``'s :data:`AUTOTUNE_OPTIONS`. Each
    compiled block or copy is one more entry for the same code object (TSAM.forward: four sizes, in stage I
    and in the frozen copy; each batch shape): dynamo's default limit of 8 would silently leave the rest
    uncompiled, so it is raised."""
    if autotune not in AUTOTUNE_OPTIONS:
        raise ValueError(f"runtime.autotune: unknown {autotune!r}; choose one of {', '.join(AUTOTUNE_OPTIONS)}")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    from torch._inductor import config as inductor_config

    wanted = {**COMPILE_OPTIONS["options"], **AUTOTUNE_OPTIONS[autotune]}
    options = {key: value for key, value in wanted.items() if hasattr(inductor_config, key)}  # this release's
    return torch.compile(fn, dynamic=COMPILE_OPTIONS["dynamic"], options=options)


def main_branch_maps(backbone: nn.Module, attention: nn.ModuleList, images: Tensor) -> list[Tensor]:
    """Post-attention maps of layers 2..5: stem, then each stage followed by its attention block."""
    x = backbone.stem(images)
    maps = []
    for stage, block in zip(backbone.stages, attention):
        x = block(stage(x))
        maps.append(x)
    return maps


class _AttentionLeaves(fx.Tracer):
    """Traces the main branch with each attention block kept as one module (to be compiled on its own)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ATTENTION_BLOCKS) or super().is_leaf_module(m, module_qualified_name)


class _MainBranch(nn.Module):
    def __init__(self, backbone: nn.Module, attention: nn.ModuleList) -> None:
        super().__init__()
        self.backbone, self.attention = backbone, attention

    def forward(self, images: Tensor) -> list[Tensor]:
        return main_branch_maps(self.backbone, self.attention, images)


class ConvReLU(nn.Module):
    """ReLU(conv(x)) of a BN-folded conv: one cuDNN kernel on a GPU.

    cuDNN's fused ops have no autocast rule (autocast passes their inputs through as they are), so the
    input is cast to the weights' dtype here, as autocast casts a conv's input: the fp32 images
    reaching the stem under bf16 autocast would otherwise meet bf16 weights and be refused."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        x = x.to(c.weight.dtype)
        if x.is_cuda:
            return torch.cudnn_convolution_relu(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return F.relu(c(x))


class ConvAddReLU(nn.Module):
    """ReLU(conv(x) + shortcut), the end of a residual block: one cuDNN kernel on a GPU (inputs cast
    to the weights' dtype, as in :class:`ConvReLU`)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor, shortcut: Tensor) -> Tensor:
        c = self.conv
        x, shortcut = x.to(c.weight.dtype), shortcut.to(c.weight.dtype)
        if x.is_cuda:
            return torch.cudnn_convolution_add_relu(
                x, c.weight, shortcut, 1.0, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return F.relu(c(x) + shortcut)


class PointwiseConv(nn.Module):
    """A BN-folded 1x1, stride-1 conv (and the ReLU after it, with ``relu``) as one GEMM on the NHWC view
    of a channels_last input: rows = pixels, so ``x @ W^T + b`` is the conv, and ``torch.addmm`` /
    ``torch._addmm_activation`` add the bias (and apply the ReLU) in cuBLASLt's epilogue instead of
    separate passes. On an H200, bf16, batch 64 at 384x192, ResNet50's 1x1 convs took 0.056-0.079 ms this
    way against 0.070-0.336 ms as cuDNN conv + bias + ReLU (``reports/bench/probe_cuda.json``).
    Other layouts (a CPU copy is NCHW) run the conv itself. Inputs are cast to the weights' dtype, as
    autocast casts a conv's input."""

    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        self.conv, self.relu = conv, relu

    @staticmethod
    def applies(conv: nn.Module) -> bool:
        return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
                and conv.padding in ((0, 0), "valid") and conv.groups == 1 and conv.bias is not None)

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        x = x.to(c.weight.dtype)
        n, channels, h, w = x.shape
        nhwc = x.permute(0, 2, 3, 1)
        if not nhwc.is_contiguous():
            y = c(x)
            return F.relu(y) if self.relu else y
        rows, weight = nhwc.reshape(n * h * w, channels), c.weight.reshape(c.out_channels, channels).t()
        y = torch._addmm_activation(c.bias, rows, weight) if self.relu else torch.addmm(c.bias, rows, weight)
        return y.view(n, h, w, c.out_channels).permute(0, 3, 1, 2)  # channels_last, no copy


def _substitute(graph: fx.GraphModule, name: str, module: nn.Module, args: tuple, nodes: list[fx.Node]) -> None:
    """Call ``module`` (added as ``name``) on ``args`` in place of ``nodes``, a chain whose first node's
    output is the chain's result and whose other nodes are used only inside it."""
    graph.add_submodule(name, module)
    with graph.graph.inserting_before(nodes[0]):
        new = graph.graph.call_module(name, args)
    nodes[0].replace_all_uses_with(new)
    for node in nodes:
        graph.graph.erase_node(node)


def _recompiled(graph: fx.GraphModule) -> fx.GraphModule:
    graph.graph.lint()
    graph.delete_all_unused_submodules()
    graph.recompile()
    return graph


def pointwise_convs_as_gemm(graph: fx.GraphModule) -> fx.GraphModule:
    """Replace every 1x1 stride-1 conv with a :class:`PointwiseConv`, taking in a ReLU that is its only user."""
    modules = dict(graph.named_modules())
    for node in list(graph.graph.nodes):
        if node.op != "call_module" or not PointwiseConv.applies(modules[node.target]):
            continue
        users = list(node.users)
        relu = (len(users) == 1 and users[0].op == "call_module"
                and isinstance(modules[users[0].target], nn.ReLU))
        _substitute(graph, f"{node.target}_gemm".replace(".", "_"), PointwiseConv(modules[node.target], relu),
                    node.args, [users[0], node] if relu else [node])
    return _recompiled(graph)


def fuse_conv_relu(graph: fx.GraphModule) -> fx.GraphModule:
    """Replace conv -> ReLU and conv -> add -> ReLU (the conv's output used nowhere else) in place."""
    modules = dict(graph.named_modules())

    def single_use_conv(node: object) -> fx.Node | None:
        if (isinstance(node, fx.Node) and node.op == "call_module" and type(modules[node.target]) is nn.Conv2d
                and modules[node.target].padding_mode == "zeros" and len(node.users) == 1):
            return node
        return None

    for node in list(graph.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.ReLU):
            continue
        source = node.args[0]
        conv, extra, kind = single_use_conv(source), (), ConvReLU
        if conv is None and isinstance(source, fx.Node) and source.op == "call_function" and source.target in (
                operator.add, operator.iadd, torch.add) and len(source.users) == 1 and len(source.args) == 2:
            a, b = source.args
            conv, extra = (single_use_conv(a), (b,)) if single_use_conv(a) else (single_use_conv(b), (a,))
            kind = ConvAddReLU
        if conv is None:
            continue
        _substitute(graph, f"{conv.target}_relu".replace(".", "_"), kind(modules[conv.target]),
                    (conv.args[0], *extra), [node, source, conv] if source is not conv else [node, conv])
    return _recompiled(graph)


def fold_main_branch(backbone: nn.Module, attention: nn.ModuleList, dtype: torch.dtype | None = None,
                     fuse_relu: bool = False, attention_leaves: bool = False) -> nn.Module:
    """An inference copy of the main branch with each conv's BatchNorm folded in, in ``dtype``
    (default: the weights' own); with ``fuse_relu``, conv-ReLU and conv-add-ReLU as single cuDNN modules,
    else the 1x1 convs as :class:`PointwiseConv` GEMMs; with ``attention_leaves``, each attention block
    stays one module (as it is), else its ops join the copy's. The originals must be in eval mode; they
    are not changed."""
    if backbone.training or attention.training:
        raise RuntimeError("fold_main_branch: the main branch must be in eval mode (its BN statistics frozen)")
    branch = _MainBranch(backbone, attention)
    tracer = _AttentionLeaves() if attention_leaves else fx.Tracer()
    traced = fx.GraphModule(branch, tracer.trace(branch))
    folded = fuse(traced, no_trace=True)  # a deep copy: the model's own modules stay as they are
    folded = fuse_conv_relu(folded) if fuse_relu else pointwise_convs_as_gemm(folded)
    folded.requires_grad_(False).eval()
    return folded.to(dtype=dtype) if dtype is not None else folded


def fused_copy_problem(fused: nn.Module, folded: nn.Module, images: Tensor, tolerance: float = 0.05) -> str | None:
    """Why ``fused`` cannot stand in for ``folded`` on ``images`` (it fails, or a map differs by more than
    ``tolerance`` relative to the folded one's norm), or None when it can."""
    try:
        with torch.no_grad():
            got, want = fused(images), folded(images)
    except Exception as err:  # RuntimeError, NotImplementedError, AcceleratorError...: any refusal
        return f"cuDNN refused it ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})"
    diff = max(((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-12)).item() for x, y in zip(got, want))
    return None if diff < tolerance else f"its maps differ from the folded copy's by {diff:.3g}"


class FrozenMainBranch:
    """The inference copy of a model's main branch (``folded`` or ``fused``), rebuilt when its weights,
    device or dtypes change."""

    def __init__(self, mode: str = "folded") -> None:
        if mode not in ("folded", "fused"):
            raise ValueError(f"runtime.frozen_main: a copy is folded or fused, got {mode!r}")
        self.mode = mode
        # set by PFENet.compile_blocks: off | regions (attention blocks) | all (the copy), and runtime.autotune
        self.compile = "off"
        self.autotune = "off"
        self._key: tuple | None = None
        self._folded: nn.Module | None = None

    @staticmethod
    def _key_of(backbone: nn.Module, attention: nn.ModuleList, images: Tensor) -> tuple:
        device = images.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        tensors = [*backbone.parameters(), *backbone.buffers(), *attention.parameters(), *attention.buffers()]
        first = tensors[0]
        return (first.device, first.dtype, autocast, tuple(t._version for t in tensors))

    def _build(self, backbone: nn.Module, attention: nn.ModuleList, images: Tensor, dtype: torch.dtype | None) -> nn.Module:
        on_gpu = images.device.type == "cuda"

        def make(fuse_relu: bool) -> nn.Module:
            copy = fold_main_branch(backbone, attention, dtype=dtype, fuse_relu=fuse_relu,
                                    attention_leaves=self.compile == "regions")
            return copy.to(memory_format=torch.channels_last) if on_gpu else copy

        copy = make(False)
        if self.mode == "fused" and on_gpu:  # check cuDNN's fused kernels once against the folded copy
            fused = make(True)
            problem = fused_copy_problem(fused, copy, images)
            if problem is None:
                copy = fused
            else:
                warnings.warn(f"runtime.frozen_main=fused: {problem}; stage II runs the folded copy instead",
                              RuntimeWarning, stacklevel=3)
        if self.compile == "all":
            return compiled(copy, self.autotune)
        if self.compile == "regions":  # the attention blocks the copy calls as modules
            for node in copy.graph.nodes:
                if node.op == "call_module" and isinstance(copy.get_submodule(node.target), ATTENTION_BLOCKS):
                    parent, _, name = node.target.rpartition(".")
                    setattr(copy.get_submodule(parent), name, compiled(copy.get_submodule(node.target), self.autotune))
        return copy

    def __call__(self, backbone: nn.Module, attention: nn.ModuleList, images: Tensor) -> list[Tensor]:
        key = self._key_of(backbone, attention, images)
        if key != self._key:
            self._folded = None  # free the old copy before making the new one
            self._folded = self._build(backbone, attention, images, dtype=key[2])
            self._key = key
        assert self._folded is not None
        with torch.no_grad():
            return self._folded(images)
