"""The reference's edit, timed: ByteDance-Seed/Bagel's InterleaveInferencer with an input image.

    BAGEL_REF=.bagel-ref python bench/bagel_ref_edit.py --tools .bagel-tools --size 1024 --steps 50

The model and inferencer are the ones the reference bench (shared/tools/bagel-ref/bench.py, in
--tools) builds: it runs here first, with one short t2i row as its warm-up, so both t2i and edit
figures come from the same construction. Then one edit (image + instruction) with the notebook's
edit settings (cfg_text 4, cfg_img 2, interval [0, 1], text_channel renorm, shift 3) runs at
batch 1 (the inferencer serves one request at a time), after a 2-step warm-up edit. Timed: the
whole inferencer call (VAE/ViT context of the image, prefill, denoising, decode). Prints
`REF edit HxW steps=N: S s/image`. bench_bagel.py --reference runs this in its own subprocess.
"""

from __future__ import annotations

import argparse
import runpy
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tools", required=True, help="the reference bench's folder (bench.py and stubs/)")
    ap.add_argument("--size", type=int, default=1024, help="the input image's side (the reference resizes it)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    bench = Path(args.tools) / "bench.py"
    sys.argv = [str(bench), "--rows", "64:2:1.0" if args.tiny else "512:2:1.0"] + (["--tiny"] if args.tiny else [])
    ref = runpy.run_path(str(bench), run_name="bagel_ref_bench")  # builds the model; times its warm-up row
    from PIL import Image

    image = Image.effect_noise((args.size, args.size), 64).convert("RGB")
    settings = dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=[0.0, 1.0], cfg_renorm_type="text_channel",
                    cfg_renorm_min=0.0, timestep_shift=3.0)
    prompt = "make the sky purple and add a small red boat"

    def edit(steps: int):
        ref["sync"]()
        t0 = time.time()
        torch = ref["torch"]  # as the reference bench's own rows: on the CPU (--tiny) the bf16 autocast comes from here
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=ref["dev"] == "cpu"):
            out = ref["inf"](image=image, text=prompt, num_timesteps=steps, **settings)
        ref["sync"]()
        assert out["image"] is not None, out
        return time.time() - t0, out["image"].size

    edit(2)  # warm-up
    dt, (w, h) = edit(args.steps)
    print(f"REF edit {h}x{w} steps={args.steps}: {dt:.2f} s/image (input {args.size}x{args.size})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
