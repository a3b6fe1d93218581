"""CycleINR: arbitrary-scale slice upsampling of CT and MR volumes (pure Python, no Slicer)."""

__version__ = "0.1.0"
