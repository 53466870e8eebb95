"""Training health: rules, the first non-finite module, pictures, :class:`HealthMonitor`."""
