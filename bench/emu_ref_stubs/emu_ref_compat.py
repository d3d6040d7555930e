"""What baaivision/Emu @ 13c395e needs from transformers 5 (the reference targets 4.29-4.31).

Import this before the reference. Everything here only fills what transformers 5 removed, with the
4.x behaviour; nothing of the reference is changed.

- transformers.pytorch_utils.find_pruneable_heads_and_indices and the module
  transformers.utils.model_parallel_utils (get_device_map, assert_device_map): imported by Emu1's copy
  of T5 (models/modeling_t5.py) at module level; used only by prune_heads / parallelize (never called).
- PreTrainedModel.get_extended_attention_mask / invert_attention_mask / get_head_mask (4.x
  ModuleUtilsMixin): called by that T5 copy's T5Stack.forward (Emu1's CausalFormer, image prompts).
- T5Config.from_pretrained("t5-base"): Emu1's CausalFormer reads the hub config of t5-base; the GPU
  machine has no network, so the name resolves to a local copy of that config.json (T5_BASE_DIR). The
  loaded config gets `add_cross_attention = False` when it lacks it (a PretrainedConfig default in 4.x,
  removed in 5; the T5 copy's T5Block reads it).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
import transformers
import transformers.pytorch_utils as _pu
from transformers.modeling_utils import PreTrainedModel
from transformers.models.t5.configuration_t5 import T5Config

T5_BASE_DIR = Path(__file__).resolve().parent / "t5-base"  # the adapter may point it elsewhere (tiny)


def find_pruneable_heads_and_indices(heads, n_heads, head_size, already_pruned_heads):
    mask = torch.ones(n_heads, head_size)
    heads = set(heads) - already_pruned_heads
    for head in heads:
        head = head - sum(1 if h < head else 0 for h in already_pruned_heads)
        mask[head] = 0
    mask = mask.view(-1).contiguous().eq(1)
    index = torch.arange(len(mask))[mask].long()
    return heads, index


if not hasattr(_pu, "find_pruneable_heads_and_indices"):
    _pu.find_pruneable_heads_and_indices = find_pruneable_heads_and_indices


def get_device_map(n_layers, devices):
    layers = list(range(n_layers))
    n_blocks = -(-n_layers // len(devices))
    return dict(zip(devices, [layers[i: i + n_blocks] for i in range(0, n_layers, n_blocks)]))


def assert_device_map(device_map, num_blocks):
    blocks = list(range(num_blocks))
    assigned = [b for v in device_map.values() for b in v]
    if sorted(assigned) != blocks:
        raise ValueError(f"device_map does not assign each of the {num_blocks} blocks exactly once")


if "transformers.utils.model_parallel_utils" not in sys.modules:
    try:
        import transformers.utils.model_parallel_utils  # noqa: F401
    except ImportError:
        m = types.ModuleType("transformers.utils.model_parallel_utils")
        m.get_device_map, m.assert_device_map = get_device_map, assert_device_map
        sys.modules[m.__name__] = m
        transformers.utils.model_parallel_utils = m


def _get_extended_attention_mask(self, attention_mask, input_shape, device=None, dtype=None):
    dtype = dtype or self.dtype
    if attention_mask.dim() == 3:
        ext = attention_mask[:, None, :, :]
    elif attention_mask.dim() == 2:
        if self.config.is_decoder:
            b, s = input_shape
            seq = torch.arange(s, device=attention_mask.device)
            causal = (seq[None, None, :].repeat(b, s, 1) <= seq[None, :, None]).to(attention_mask.dtype)
            if causal.shape[1] < attention_mask.shape[1]:
                prefix = attention_mask.shape[1] - causal.shape[1]
                causal = torch.cat([torch.ones((b, s, prefix), device=attention_mask.device, dtype=causal.dtype),
                                    causal], dim=-1)
            ext = causal[:, None, :, :] * attention_mask[:, None, None, :]
        else:
            ext = attention_mask[:, None, None, :]
    else:
        raise ValueError(f"Wrong shape for input_ids (shape {input_shape}) or attention_mask (shape {attention_mask.shape})")
    ext = ext.to(dtype=dtype)
    return (1.0 - ext) * torch.finfo(dtype).min


def _invert_attention_mask(self, encoder_attention_mask):
    if encoder_attention_mask.dim() == 3:
        ext = encoder_attention_mask[:, None, :, :]
    else:
        ext = encoder_attention_mask[:, None, None, :]
    ext = ext.to(dtype=self.dtype)
    return (1.0 - ext) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
    if head_mask is None:
        return [None] * num_hidden_layers
    raise NotImplementedError("head masks are not used by the Emu references")


for _name, _fn in (("get_extended_attention_mask", _get_extended_attention_mask),
                   ("invert_attention_mask", _invert_attention_mask), ("get_head_mask", _get_head_mask)):
    if not hasattr(PreTrainedModel, _name):
        setattr(PreTrainedModel, _name, _fn)

_t5_from_pretrained = T5Config.from_pretrained.__func__


def _t5_config_from_pretrained(cls, name, *args, **kwargs):
    if str(name) in ("t5-base", "google-t5/t5-base"):
        name = str(T5_BASE_DIR)
    cfg = _t5_from_pretrained(cls, name, *args, **kwargs)
    if not hasattr(cfg, "add_cross_attention"):  # a PretrainedConfig default in 4.x, gone in 5
        cfg.add_cross_attention = False
    return cfg


T5Config.from_pretrained = classmethod(_t5_config_from_pretrained)
