"""Base layer: dictionaries, model loading, data. Never imports the top-level modules."""

from .version import __version__  # noqa: F401
