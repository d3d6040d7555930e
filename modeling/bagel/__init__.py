"""BAGEL (ByteDance-Seed/Bagel) re-implemented in plain PyTorch."""
