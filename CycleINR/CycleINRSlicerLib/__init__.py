"""The Qt-free parts of the Upsample slices module, testable with slicer-core alone.

A package, not files beside CycleINR.py: Slicer loads every .py file at the top of a module
folder as a scripted module, and would run these again as modules that fail to load.
"""
