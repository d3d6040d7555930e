"""Sampler parameters of the Emu families (t2i and compose share them).

Defaults are the reference pipelines' (modeling.emu.decoder.DEFAULTS: Emu2-Gen 1024², 50
Euler steps, guidance 3; Emu1 512², 50 PNDM steps, guidance 7.5); they are written nowhere
else. Guidance applies when the scale is > 1 (a row at <= 1 gets no unconditional pass).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from modeling.emu.decoder import DEFAULTS
from pipeline.family import Params

Scale = Annotated[float, Field(strict=True, ge=0.0, le=100.0)]
Steps = Annotated[int, Field(strict=True, ge=1, le=1000)]
# the unets downsample latents (1/8 of the pixels) up to 8x more: 64 fits both released shapes
SIDE_STRIDE, SIDE_MAX = 64, 2048
Side = Annotated[int, Field(strict=True, ge=SIDE_STRIDE, le=SIDE_MAX, multiple_of=SIDE_STRIDE)]
Coord = Annotated[int, Field(strict=True, ge=0, le=8192)]


def _defaults(variant: str) -> tuple[tuple[int, int], int, float]:
    height, width, steps, guidance = DEFAULTS[variant]
    return (height, width), steps, guidance


_EMU2_SIZE, _EMU2_STEPS, _EMU2_GUIDANCE = _defaults("emu2")
_EMU1_SIZE, _EMU1_STEPS, _EMU1_GUIDANCE = _defaults("emu1")


class Emu2Sampler(Params):
    guidance_scale: Scale = _EMU2_GUIDANCE
    num_inference_steps: Steps = _EMU2_STEPS
    default_size: tuple[Side, Side] = _EMU2_SIZE  # [height, width] when the row gives none
    # SDXL micro-conditioning (time ids); None: the reference's (1024, 1024) and (0, 0)
    original_size: tuple[Coord, Coord] | None = None  # [height, width]
    crop_top_left: tuple[Coord, Coord] | None = None  # [top, left]


class Emu1Sampler(Params):
    guidance_scale: Scale = _EMU1_GUIDANCE
    num_inference_steps: Steps = _EMU1_STEPS
    default_size: tuple[Side, Side] = _EMU1_SIZE  # [height, width] when the row gives none


SAMPLERS: dict[str, type[Params]] = {"emu2": Emu2Sampler, "emu1": Emu1Sampler}
