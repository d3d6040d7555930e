"""More of the reference, timed: ByteDance-Seed/Bagel's InterleaveInferencer beyond plain t2i.

    BAGEL_REF=.bagel-ref python bench/bagel_ref_inferencer.py --tools .bagel-tools --task edit --size 1024
    BAGEL_REF=.bagel-ref python bench/bagel_ref_inferencer.py --tools .bagel-tools --task taylorseer --size 1024

The model and inferencer are the ones the reference bench (shared/tools/bagel-ref/bench.py, in
--tools) builds: it runs here first, with one short t2i row as its warm-up, so these figures come
from the same construction as its t2i ones. Batch 1 (the inferencer serves one request at a time).
Timed: the whole inferencer call.
- edit: one image + instruction with the notebook's edit settings (cfg_text 4, cfg_img 2, interval
  [0, 1], text_channel renorm, shift 3), after a 2-step warm-up edit. Prints
  `REF edit HxW steps=N: S s/image`.
- taylorseer: t2i with the notebook's settings, exact and then with the reference's own TaylorSeer
  cache (`enable_taylorseer=True`: a full forward every 3rd step after 5, up to 6th-order Taylor
  terms), from the same seed; the PSNR of the cached image against the exact one. Prints
  `REF taylorseer HxW steps=N: exact S s, taylorseer S s, PSNR P dB`.
bench_bagel.py --reference runs this in its own subprocess.
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
    ap.add_argument("--task", choices=["edit", "taylorseer"], required=True)
    ap.add_argument("--size", type=int, default=1024, help="the image's side (edit: the input's; the reference resizes it)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    bench = Path(args.tools) / "bench.py"
    sys.argv = [str(bench), "--rows", "64:2:1.0" if args.tiny else "512:2:1.0"] + (["--tiny"] if args.tiny else [])
    ref = runpy.run_path(str(bench), run_name="bagel_ref_bench")  # builds the model; times its warm-up row
    import numpy as np
    from PIL import Image

    torch = ref["torch"]

    def call(steps: int, **kw):
        ref["sync"]()
        t0 = time.time()
        # as the reference bench's own rows: on the CPU (--tiny) the bf16 autocast comes from here
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=ref["dev"] == "cpu"):
            out = ref["inf"](num_timesteps=steps, cfg_text_scale=4.0, timestep_shift=3.0, cfg_renorm_min=0.0, **kw)
        ref["sync"]()
        assert out["image"] is not None, out
        return time.time() - t0, out["image"]

    if args.task == "edit":
        edit = dict(image=Image.effect_noise((args.size, args.size), 64).convert("RGB"),
                    text="make the sky purple and add a small red boat", cfg_img_scale=2.0, cfg_interval=[0.0, 1.0],
                    cfg_renorm_type="text_channel")
        call(2, **edit)  # warm-up
        dt, img = call(args.steps, **edit)
        print(f"REF edit {img.size[1]}x{img.size[0]} steps={args.steps}: {dt:.2f} s/image (input {args.size}x{args.size})",
              flush=True)
        return 0
    t2i = dict(text=ref["prompt"], cfg_img_scale=1.0, cfg_interval=[0.4, 1.0], cfg_renorm_type="global",
               image_shapes=(args.size, args.size))
    got = []
    for cached in (False, True):
        torch.manual_seed(0)  # the reference draws its initial noise from the global generator
        got.append(call(args.steps, enable_taylorseer=cached, **t2i))
    (t_exact, exact), (t_cached, cached) = got
    mse = float(np.mean((np.asarray(exact, np.float64) - np.asarray(cached, np.float64)) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
    print(f"REF taylorseer {args.size}x{args.size} steps={args.steps}: exact {t_exact:.2f} s, taylorseer {t_cached:.2f} s, "
          f"PSNR {psnr:.1f} dB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
