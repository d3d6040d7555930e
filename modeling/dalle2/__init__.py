"""DALLE2 (LAION / lucidrains DALLE2-pytorch layout): prior, decoder unets, CLIP, samplers."""
