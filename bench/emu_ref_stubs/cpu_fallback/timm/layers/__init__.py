import collections.abc
from itertools import repeat

from torch.nn.init import trunc_normal_  # noqa: F401  (timm's trunc_normal_ has the same semantics)


def to_2tuple(x):
    if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
        return tuple(x)
    return tuple(repeat(x, 2))


def drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    if drop_prob == 0.0 or not training:
        return x
    keep = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    t = x.new_empty(shape).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        t.div_(keep)
    return x * t
