"""opus: a 24/7 orchestrator for an autonomous coding agency that lives in a markdown vault."""

__version__ = "0.1.0"
