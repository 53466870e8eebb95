"""The Hydra side: ``instantiate_callbacks`` and ``validate_callback_config`` (the YAML group is ``lightning_inspect/conf``)."""
