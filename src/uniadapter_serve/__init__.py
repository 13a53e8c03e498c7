"""UniAdapter Serve: one frozen BLIP backbone, many hot-swapped UniAdapter sets."""

__version__ = "0.1.0"
