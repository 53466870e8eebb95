"""Put lightning-inspect's ``inspect`` config group on every Hydra app's search path, so any
Hydra app can run ``python train.py +inspect=activations``.

Hydra imports this module in every app and consults the entry while composing, so neither may
import torch, lightning or ``lightning_inspect``: the folder is found with
:func:`importlib.util.find_spec` (which does not run the package) and added as ``file://``; only
a package that is not a plain folder (a zip import) falls back to ``pkg://``, which imports it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

PROVIDER = "lightning-inspect"
#: The importable location of the group: ``lightning_inspect/conf/inspect/*.yaml``.
PACKAGE_SEARCH_PATH = "pkg://lightning_inspect.conf"


def conf_search_path() -> str:
    """The search-path entry of the shipped configs: ``file://<package>/conf`` or the pkg:// one.

    Example:
        >>> conf_search_path().endswith("lightning_inspect/conf") or conf_search_path()
        True
    """
    try:
        spec = importlib.util.find_spec("lightning_inspect")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        conf = Path(location) / "conf"
        if (conf / "inspect").is_dir():
            return f"file://{conf.as_posix()}"
    return PACKAGE_SEARCH_PATH


class LightningInspectSearchPathPlugin(SearchPathPlugin):
    """Append lightning-inspect's config folder (provider ``lightning-inspect``) to the search path.

    Appended, not prepended: an app's own ``inspect/<option>.yaml`` wins over the shipped one.
    Hydra finds this class by itself; check with ``python train.py --info searchpath``.
    """

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider=PROVIDER, path=conf_search_path())
