"""Hydra search-path plugin of lightning-inspect (see :mod:`.lightning_inspect_searchpath`)."""
