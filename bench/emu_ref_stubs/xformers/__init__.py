"""xformers stand-in for the Emu reference: the GPU machine has no xformers.

Only `xformers.ops.memory_efficient_attention` is provided (ops.py), over torch SDPA."""
