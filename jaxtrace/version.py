"""The package's version, in a leaf module that imports nothing, so every layer (and the build) can read it."""

__version__ = "0.2.0"
