"""The page's static files (for the TensorBoard plugin) and the page with them inlined (MLflow).

Example:
    >>> html = render_page({"run": RunData()}, title="demo")
    >>> html.startswith("<!DOCTYPE html>") and "<title>demo</title>" in html
    True
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from importlib import resources

from lightning_inspect.overview.model import RunData, safe_json

_JS = "application/javascript"
ASSETS = {"index.js": _JS, "overview.js": _JS, "overview.css": "text/css"}  #: overview/static


def asset(name: str) -> bytes:
    """The content of one of :data:`ASSETS`."""
    return resources.files("lightning_inspect.overview").joinpath("static", name).read_bytes()


def render_page(runs: Mapping[str, RunData], title: str = "lightning-inspect overview") -> str:
    """The page with ``runs`` (name -> data) inlined."""
    data = safe_json({"runs": {name: run.to_json_dict() for name, run in runs.items()}})
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>\n"
        f"<style>{asset('overview.css').decode()}</style></head>\n"
        '<body><div id="inspect-root"></div>\n'
        f'<script type="application/json" id="inspect-data">{data}</script>\n'
        f"<script>{asset('overview.js').decode()}</script>\n"
        "<script>LightningInspectOverview.start(document.getElementById('inspect-root'), "
        "LightningInspectOverview.inlineSource("
        "JSON.parse(document.getElementById('inspect-data').textContent)));</script>\n"
        "</body></html>\n"
    )
