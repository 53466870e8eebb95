"""The run record: :class:`RunRecord` and the parts it writes (git, environment, config, construction record)."""
