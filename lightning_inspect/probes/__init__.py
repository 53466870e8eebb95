"""Probes: inspection code switched on by tag (``context``) or during a fit (``switch``)."""
