"""The score stage's CLIP score against torchmetrics' own CLIPScore, and its throughput.

    python bench/bench_clip_score.py          # on a machine with torchmetrics and a GPU (CPU only without one)

1. Agreement: a tiny random CLIP (`make-tiny clip`), 64 images of mixed sizes, scored by
   `ClipScorer` (CPU float32, CUDA float32, CUDA bfloat16) and by torchmetrics' `CLIPScore`
   one pair at a time. Two shims let torchmetrics 1.9 run here and change none of its
   arithmetic: it only accepts the hub names it lists (the tiny directory is loaded the same
   way instead), and transformers 5's `get_*_features` return the output object whose
   `pooler_output` is the projected tensor torchmetrics expects.
2. Throughput: a CLIP of ViT-L/14's size (random weights), batches of 64 images of 512²
   with their prompts, preprocessing included, float32 and bfloat16.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.clip_score import ClipScorer, write_tiny_clip  # noqa: E402


def torchmetrics_scores(directory: str, images: list[np.ndarray], prompts: list[str], device: str) -> np.ndarray:
    import torchmetrics.multimodal.clip_score as tmc
    from transformers import CLIPModel, CLIPProcessor

    def load(name):
        model = CLIPModel.from_pretrained(name)
        image, text = model.get_image_features, model.get_text_features
        if not isinstance(image(torch.zeros(1, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)),
                          torch.Tensor):  # transformers >= 5
            model.get_image_features = lambda *a, **k: image(*a, **k).pooler_output
            model.get_text_features = lambda *a, **k: text(*a, **k).pooler_output
        return model, CLIPProcessor.from_pretrained(name)

    tmc._get_clip_model_and_processor = load
    metric = tmc.CLIPScore(model_name_or_path=directory).to(device)
    out = []
    for img, p in zip(images, prompts):
        metric.reset()
        metric.update(torch.from_numpy(img).permute(2, 0, 1).to(device), p)
        out.append(float(metric.compute()))
    return np.asarray(out)


def main() -> None:
    import tempfile

    import transformers

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name() if len(devices) > 1 else "")
    directory = write_tiny_clip(Path(tempfile.mkdtemp()) / "clip")
    rng = np.random.default_rng(0)
    sizes = [(16, 16), (24, 40), (64, 48), (7, 30), (3, 20), (33, 33), (40, 8), (128, 96)] * 8
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    prompts = [f"a photo number {i} of a cat on a red chair" for i in range(len(images))]
    ref = torchmetrics_scores(directory, images, prompts, "cpu")
    for dev, dtype in [(d, torch.float32) for d in devices] + ([("cuda", torch.bfloat16)] if len(devices) > 1 else []):
        got = ClipScorer.load(directory, device=dev, dtype=dtype).score(images, prompts)
        diff = np.abs(got - ref)
        print(f"ClipScorer {dev} {dtype} vs torchmetrics (cpu): max |diff| {diff.max():.3g}, max relative {(diff / ref).max():.3g}")
    if len(devices) == 1:
        return
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    cfg = CLIPConfig(text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                     vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                        image_size=224, patch_size=14), projection_dim=768)
    processor = CLIPProcessor.from_pretrained(directory)
    processor.image_processor.size, processor.image_processor.crop_size = {"shortest_edge": 224}, {"height": 224, "width": 224}
    big = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(64)]
    for dtype in (torch.float32, torch.bfloat16):
        scorer = ClipScorer(CLIPModel(cfg).to("cuda", dtype).eval(), processor, "cuda")
        scorer.score(big, prompts[:64])
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            scorer.score(big, prompts[:64])
        torch.cuda.synchronize()
        print(f"ViT-L/14 size, batches of 64 at 512², {dtype}: {5 * 64 / (time.perf_counter() - start):.0f} images/s")


if __name__ == "__main__":
    main()
