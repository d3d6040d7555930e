"""CPU-machine fallback only (sys.path end): the real timm is on the GPU machine and wins there.
What the Emu references import from timm: drop_path, to_2tuple, trunc_normal_ (timm's semantics)."""
