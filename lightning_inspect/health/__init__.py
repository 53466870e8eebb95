"""Training health: rules over the statistics, the first non-finite module, pictures, :class:`HealthMonitor`."""
