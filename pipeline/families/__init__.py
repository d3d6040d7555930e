"""Family registry: a built-in name, or `package.module:ATTR` for your own."""

from __future__ import annotations

import importlib

from pipeline.family import Family

BUILTIN = {"bagel": "pipeline.families.bagel:FAMILY", "dalle2": "pipeline.families.dalle2:FAMILY"}


def get_family(name: str) -> Family:
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown family {name!r}: use one of {', '.join(BUILTIN)} or 'package.module:ATTR'")
    module, attr = target.split(":", 1)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load family {name!r} from {target}: {e}") from None
