"""A layer stack split across several devices: a pipeline split by layer.

A model too large for one GPU runs on an actor that holds several (`num_gpus: 2`): its
transformer layers are cut into contiguous runs, one run per device, and a forward hands its
activations from one device to the next at each cut. What every layer reads besides the
activations (RoPE tables, the attention plan, routing indices) is copied once per run to that
run's device; a KV cache keeps each layer's keys and values on that layer's device (see
modeling/bagel/layers.py KVCache `layer_devices`). Only one device works at a time (no
micro-batching): the point is memory, and the outputs are those of the unsplit stack.

Runs are kept by position, not by comparing devices, so that two handles of one device (two
"cpu"s in the tests) still make a real cut with a hand-off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

# called at each hand-off with (index of the layer the activations go to, or None for back to
# the home device; from device; to device)
HandoffHook = Callable[[int | None, torch.device, torch.device], None]


def balanced_runs(n_layers: int, n_devices: int) -> list[range]:
    """Contiguous runs of layers, one per device, sizes differing by at most one (the first runs take the extra)."""
    if not 1 <= n_devices <= n_layers:
        raise ValueError(f"cannot split {n_layers} layers over {n_devices} devices (1 to {n_layers})")
    base, extra = divmod(n_layers, n_devices)
    runs, start = [], 0
    for d in range(n_devices):
        size = base + (d < extra)
        runs.append(range(start, start + size))
        start += size
    return runs


def to_device(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor in it on `device`: through tuples, lists, dicts and dataclasses; other values as they are."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(x, device) for x in obj)
    if isinstance(obj, list):
        return [to_device(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init})
    return obj


class LayerSplit:
    """Which device holds which layer, and the forward through them run by run."""

    def __init__(self, devices: Sequence[torch.device | str], n_layers: int):
        self.devices = [torch.device(d) for d in devices]
        self.runs = balanced_runs(n_layers, len(self.devices))
        self.run_of = [r for r, run in enumerate(self.runs) for _ in run]
        self._hooks: list[HandoffHook] = []

    @property
    def home(self) -> torch.device:
        """Where the activations come from and go back to: the first device (embeddings and heads stay there)."""
        return self.devices[0]

    def layer_devices(self) -> list[torch.device]:
        return [self.devices[r] for r in self.run_of]

    def place(self, layers: nn.ModuleList) -> None:
        """Move each layer to its run's device."""
        if len(layers) != len(self.run_of):
            raise ValueError(f"the split is for {len(self.run_of)} layers, the stack has {len(layers)}")
        for layer, device in zip(layers, self.layer_devices()):
            layer.to(device)

    def register_handoff_hook(self, hook: HandoffHook) -> Callable[[], None]:
        """Call `hook` at every hand-off; returns a function that removes it."""
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook)

    def _hand_over(self, h: Tensor, layer: int | None, src: torch.device, dst: torch.device) -> Tensor:
        for hook in self._hooks:
            hook(layer, src, dst)
        return h.to(dst)

    def forward(self, layers: nn.ModuleList, h: Tensor, shared: Any, call: Callable[[nn.Module, int, Tensor, Any], Tensor]) -> Tensor:
        """`h` through every layer: `call(layer, index, h, shared)` with `h` and `shared` (what the
        layers read besides `h`, e.g. RoPE tables and the attention plan) on the layer's device.
        `h` comes back on the home device."""
        h = h.to(self.home)
        for r, run in enumerate(self.runs):
            device = self.devices[r]
            if r > 0:
                h = self._hand_over(h, run.start, self.devices[r - 1], device)
            here = to_device(shared, device)
            for i in run:
                h = call(layers[i], i, h, here)
        if len(self.runs) > 1:
            h = self._hand_over(h, None, self.devices[-1], self.home)
        return h


def devices_for(device: str, n: int) -> list[torch.device]:
    """The `n` devices a stage on `device` splits over: the first `n` CUDA devices the process sees
    (a Ray actor with `num_gpus: n` sees exactly its own), or `n` handles of one CPU device."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"expected a whole number of devices >= 1, got {n!r}")
    base = torch.device(device)
    if n == 1:
        return [base]
    if base.type != "cuda":
        return [base] * n  # stand-ins: the split runs (and is tested) without several accelerators
    if base.index not in (None, 0):
        raise ValueError(f"device {device} with {n} devices: give device cuda (the split takes cuda:0 to cuda:{n - 1})")
    visible = torch.cuda.device_count()
    if visible < n:
        raise ValueError(f"{n} devices wanted, {visible} CUDA device(s) visible (give the stage num_gpus: {n})")
    return [torch.device("cuda", i) for i in range(n)]
