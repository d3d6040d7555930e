"""Emu1 (BAAI/Emu `pretrain/`) and Emu2-Gen (BAAI/Emu2-Gen) as the genfleet families `emu1`
and `emu2`: an LLM regresses n visual embeddings one by one (autoregressively, KV-cached,
many rows per batch), a Stable-Diffusion-style decoder turns them into the image.

Tasks: t2i (a prompt), compose (a prompt mixing text and the row's `images`, a list of image
bytes or URLs: each `<image>` in the prompt takes the next image; without any placeholder the
images come first; an image-only row is Emu2's autoencoding; Emu1's in-context generation).
Stages (pipeline/families/emu_stages.py): prepare (CPU), lmm, unet, vae_decode (GPU), each on
its own actor pool or co-located (`stages: {unet: {colocate: true}, vae_decode: {colocate: true}}`).
Stage options: prepare tokenizer (slow | fast: Emu2's tokenizer.json; default slow, as the
reference); lmm max_len (KV cache tokens, default 512, grows when needed), step (graph: the
single-token step replayed from a CUDA graph, the default on a GPU | eager, the default on CPU |
compile | a torch.compile mode); unet compile; vae_decode safety_checker (default
false: the SD safety checker's verdict as the `nsfw` column, images are never blacked out).
Sampler params: emu_params.py. Outputs: the image, and embeddings `emu_visual` [n, d].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.demo_images import PROMPTS, demo_png
from pipeline.families import emu_stages as S
from pipeline.families.emu_params import SAMPLERS
from pipeline.family import Demo, InputSpec, ModelError, StageSpec, TaskSpec, directory_fingerprint

NAMES = {"emu2": "Emu2-Gen", "emu1": "Emu1"}
HASHED_SUFFIXES = (".json", ".txt", ".model")  # configs and tokenizers: their contents decide the outputs
DEMO_STEPS = 4


class EmuFamily:
    scores = {S.NSFW: "bool"}  # vae_decode's safety_checker option (null when off)

    def __init__(self, variant: str):
        self.variant = self.name = variant
        params = SAMPLERS[variant]
        self.tasks = {
            "t2i": TaskSpec(params),
            "compose": TaskSpec(params, needs_prompt=False, inputs=(InputSpec("images", many=True),)),
        }
        self._stages = [
            StageSpec("prepare", S.builder(S.build_prepare, variant), num_gpus=0, batch_size=16, reads_inputs=True),
            StageSpec("lmm", S.builder(S.Lmm, variant), batch_size=S.LMM_BATCH),
            StageSpec("unet", S.builder(S.Unet, variant), batch_size=8),
            StageSpec("vae_decode", S.builder(S.VaeDecode, variant), batch_size=8),
        ]

    def stages(self, model: str) -> list[StageSpec]:
        return self._stages

    def check_model(self, model: str) -> None:
        """The released layout (modeling.emu.load.check_layout: files present and parsing, Emu2's
        shard headers against its config, tokenizer, decoder folders); no weights read."""
        from modeling.emu.load import check_layout, detect_variant

        where = f"{self.name} model {model}"
        if not Path(model).is_dir():
            raise ModelError(f"{where}: not a directory (the {NAMES[self.variant]} model folder)")
        try:
            found = detect_variant(model)
            if found != self.variant:
                raise ModelError(f"{where}: this is an {NAMES[found]} folder; run it with family {found}")
            check_layout(model)
        except (OSError, ValueError) as e:
            if isinstance(e, ModelError):
                raise
            raise ModelError(f"{where}: {' '.join(str(e).split())}") from None

    def model_name(self, model: str) -> str:
        return f"{self.name}:" + (Path(model).name or "model")

    def model_fingerprint(self, model: str) -> str:
        """Every file's path and size (the release's Python files aside: never run), and the
        contents of the configs and tokenizers."""
        return directory_fingerprint(model, HASHED_SUFFIXES, skip_suffixes=(".py",))

    def write_tiny(self, directory: str) -> str:
        from modeling.emu.tiny import write_tiny

        return str(write_tiny(directory, self.variant))

    def demo(self) -> Demo:
        rows: list[dict[str, Any]] = [{"id": f"t2i-{i}", "task": "t2i", "prompt": p, "num_samples": 2 if i == 0 else 1}
                                      for i, p in enumerate(PROMPTS[:3])]
        rows.append({"id": "compose-0", "task": "compose", "prompt": "<image> as a watercolor", "images": [demo_png(1)]})
        if self.variant == "emu2":
            rows.append({"id": "autoencode-0", "task": "compose", "prompt": "", "images": [demo_png(2)]})
        rows.append({"id": "bad-0", "task": "compose", "prompt": "<image> next to <image>", "images": [demo_png(3)]})
        settings = [f"sampler.{t}.{k}={v}" for t in self.tasks
                    for k, v in (("num_inference_steps", DEMO_STEPS), ("default_size", "[64,64]"))]
        return Demo(rows, settings)


EMU2 = EmuFamily("emu2")
EMU1 = EmuFamily("emu1")
