"""The monitors: activations, gradients, weights (all on :class:`ModuleMonitor`) and the graph."""
