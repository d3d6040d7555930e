"""CPU-machine fallback only (sys.path end): Emu1's prediction_mixin imports PeftModel at module level
(for Emu-I understanding, unused by image generation)."""


class PeftModel:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("peft is not installed on this machine (CPU fallback stub)")
