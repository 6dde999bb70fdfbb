"""spicetap: a transparent recording and inspecting proxy for SPICE."""

__version__ = "0.1.0"
