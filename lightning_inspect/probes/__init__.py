"""Probes: inspection code switched on by tag (``context``) or for the length of a fit (``switch``)."""
