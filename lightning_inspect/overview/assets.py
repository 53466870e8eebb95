"""The page's static files (script, style, TensorBoard entry module), shipped as package data."""

from __future__ import annotations

from importlib import resources

#: The files of ``overview/static`` and their content types.
ASSETS = {
    "index.js": "application/javascript",
    "overview.js": "application/javascript",
    "overview.css": "text/css",
}


def asset(name: str) -> bytes:
    """The content of one of :data:`ASSETS`."""
    if name not in ASSETS:
        raise KeyError(f"no overview asset {name!r}; expected one of {', '.join(ASSETS)}")
    return resources.files("lightning_inspect.overview").joinpath("static", name).read_bytes()
