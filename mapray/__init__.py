"""mapray: distributed batch scoring of preference pairs by alignment potential (MAP) on Ray."""

__version__ = "0.1.0"
