"""cpal: weakly supervised semantic segmentation with Context Prototype-Aware Learning."""

__version__ = "0.1.0"
