"""genfleet's version, as installed (recorded in _summary.json and shown by --version)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("genfleet")
except PackageNotFoundError:  # a checkout that was not installed
    __version__ = "unknown"
