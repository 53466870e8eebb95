"""Hydra configs shipped with lightning-inspect: the ``inspect`` group (``pkg://lightning_inspect.conf``)."""
