"""The training step captured in a CUDA graph (``runtime.cuda_graph``).

An eager ResNet50 step launches 1,100-1,400 kernels, and on the H200 the host could not launch them as
fast as the GPU ran them: baseline 31.1 ms a step eager against 26.0 ms replayed from a graph, stage I
41.7 against 33.2, stage II 20.95 against 19.9 (``reports/bench/probe_cuda.json``). Replaying one
captured graph per step removes that host time (PyTorch's "whole-network capture").

How it stays the same training as the eager step:
- the first ``warmup`` steps of a stage run eagerly (on a side stream, as capture requires): they
  autotune cuDNN and create Adam's state, which cannot happen inside a capture;
- then the step is captured once and replayed, each batch copied into the captured input tensors;
- a batch of a shape not seen before runs eagerly too (code compiled for a new shape by
  ``runtime.compile`` cannot be compiled inside a capture; a one-off last batch is then never captured);
- it is captured again whenever the batch shape or a learning rate changes (the scheduler steps per
  epoch; the optimizer kernels hold the learning rate as a constant);
- autocast runs without its weight-cast cache inside the capture (required for capture; the casts then
  run inside the graph), and Adam is made ``capturable`` (its step counter stays on the device).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class GraphedTrainStep:
    """``step(images, pids) -> loss terms``, as the eager step, replayed from a CUDA graph.

    The returned tensors are the graph's outputs: read them (e.g. into a ``LossTally``) before the next
    call, which overwrites them."""

    def __init__(self, eager_step: Callable[..., dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
                 device: torch.device, warmup: int = 3) -> None:
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA device, got {device}")
        self.eager_step, self.optimizer, self.device = eager_step, optimizer, device
        self.warmup_left = warmup
        self.captures = 0
        self._seen_shapes: set[tuple[Any, ...]] = set()  # batch shapes that ran eagerly at least once
        self._graph: torch.cuda.CUDAGraph | None = None
        self._key: tuple[Any, ...] | None = None
        self._images: torch.Tensor | None = None
        self._pids: torch.Tensor | None = None
        self._terms: dict[str, torch.Tensor] = {}
        for group in optimizer.param_groups:
            group["capturable"] = True

    def __call__(self, images: torch.Tensor, pids: torch.Tensor) -> dict[str, torch.Tensor]:
        shape = (tuple(images.shape), images.dtype, tuple(pids.shape))
        if self.warmup_left > 0 or shape not in self._seen_shapes:
            self.warmup_left = max(0, self.warmup_left - 1)
            self._seen_shapes.add(shape)
            return self._eager_on_side_stream(images, pids)
        key = (*shape, tuple(g["lr"] for g in self.optimizer.param_groups))
        if key != self._key:
            self._capture(images, pids)
            self._key = key
        assert self._graph is not None and self._images is not None and self._pids is not None
        self._images.copy_(images, non_blocking=True)
        self._pids.copy_(pids, non_blocking=True)
        self._graph.replay()
        return self._terms

    def _eager_on_side_stream(self, images: torch.Tensor, pids: torch.Tensor) -> dict[str, torch.Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            terms = self.eager_step(images, pids, autocast_cache=False)
        torch.cuda.current_stream(self.device).wait_stream(side)
        side.synchronize()  # once per warm-up step: its tensors may then be freed from the default stream
        return terms

    def _capture(self, images: torch.Tensor, pids: torch.Tensor) -> None:
        self._graph, self._terms = None, {}  # free the previous graph's memory first
        self.optimizer.zero_grad(set_to_none=True)  # gradients come from the graph's own memory pool
        torch.cuda.synchronize(self.device)
        self._images = torch.empty_like(images, device=self.device, memory_format=torch.channels_last).copy_(images)
        self._pids = torch.empty_like(pids, device=self.device).copy_(pids)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread keeps making CUDA calls meanwhile, which would
        # invalidate a process-wide capture (seen on the H200 as cudaErrorStreamCaptureInvalidated)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._terms = self.eager_step(self._images, self._pids, autocast_cache=False)
        self._graph = graph
        self.captures += 1
