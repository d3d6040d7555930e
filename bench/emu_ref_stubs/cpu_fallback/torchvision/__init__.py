"""CPU-machine fallback only (sys.path end): the real torchvision is on the GPU machine and wins there.
The Emu pipelines build a Resize/ToTensor/Normalize transform for image prompts at construction; the
benchmark's prompts are text only, so these classes are only constructed here, never called."""
