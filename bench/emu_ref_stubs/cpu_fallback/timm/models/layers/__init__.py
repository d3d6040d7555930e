from timm.layers import drop_path, to_2tuple, trunc_normal_  # noqa: F401
