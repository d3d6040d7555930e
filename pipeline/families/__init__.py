"""The family registry: installed families (entry points in group `genfleet.families`,
e.g. `bagel = "pipeline.families.bagel:FAMILY"` in a package's pyproject), or any
`package.module:ATTR` given as the family name."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from pipeline.family import Family
from pipeline.spec import SpecError

GROUP = "genfleet.families"
DEMO_DEFAULT = "bagel"  # what `genfleet demo` runs when no family is named (one of the built-ins here)


def installed() -> dict[str, str]:
    """Registered family names -> their `module:ATTR` targets."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def get_family(name: str) -> Family:
    target = installed().get(name, name)
    if ":" not in target:
        known = ", ".join(sorted(installed())) or "none installed"
        raise SpecError(f"unknown family {name!r}: use one of {known}, or 'package.module:ATTR'")
    module, attr = target.split(":", 1)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise SpecError(f"cannot load family {name!r} from {target}: {e}") from None
