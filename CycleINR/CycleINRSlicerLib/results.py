"""Slice-consistency results: SNLI and per-slice noise levels of input and output, as a plot.

The panel takes the levels that its run's process measured (`cycleinr upsample --noise-report`),
so that no slice is measured on Slicer's GUI thread; the scripting call measures the node arrays
with CycleINRLib.metrics. The tables and the chart are plain MRML nodes, so Slicer's Plots module
shows them and pytest can check them.
"""

from dataclasses import dataclass

import numpy as np
import slicer
import vtk

from CycleINRLib import metrics
from .node_io import arrayFromVolumeNode


@dataclass
class NoiseLevels:
    """Per-slice noise levels of one volume along its slice axis."""

    name: str
    levels: np.ndarray
    sliceSpacing: float  # mm between the slices the levels belong to

    @property
    def snli(self) -> float:
        return float(metrics.snli(self.levels))

    @property
    def mean(self) -> float:
        return float(np.mean(self.levels))

    @property
    def positions(self) -> np.ndarray:
        """Distance of each slice from the first one, in mm (the same origin for input and output)."""
        return np.arange(len(self.levels)) * self.sliceSpacing


def noiseLevels(volumeNode, axis: int) -> NoiseLevels:
    """Noise levels of every slice across IJK `axis` (0=I, 1=J, 2=K)."""
    array = arrayFromVolumeNode(volumeNode)  # (k, j, i): numpy axis = 2 - IJK axis
    return NoiseLevels(volumeNode.GetName(), np.asarray(metrics.slice_noise_levels(array, 2 - axis), dtype=float),
                       float(volumeNode.GetSpacing()[axis]))


def reportedLevels(volumeNode, axis: int, report: dict) -> NoiseLevels:
    """The levels a run's process measured for `volumeNode` (its `noise` report's "input" or
    "output" entry); ValueError if they do not fit the node's slices along `axis`."""
    levels = np.asarray(report["levels"], dtype=float)
    slices = volumeNode.GetImageData().GetDimensions()[axis]
    if levels.shape != (slices,):
        raise ValueError(f"{levels.size} noise levels reported for the {slices} slices of '{volumeNode.GetName()}'")
    return NoiseLevels(volumeNode.GetName(), levels, float(volumeNode.GetSpacing()[axis]))


def summary(inputLevels: NoiseLevels, outputLevels: NoiseLevels) -> str:
    """SNLI and mean noise level side by side, for the panel and the log."""
    return (f"SNLI: input {inputLevels.snli:.4g}, output {outputLevels.snli:.4g} (lower = more consistent slices)\n"
            f"Mean noise level: input {inputLevels.mean:.4g}, output {outputLevels.mean:.4g}")


def addNoisePlot(scene, inputLevels: NoiseLevels, outputLevels: NoiseLevels):
    """A chart node with one series (backed by one table node) per volume; returns the chart."""
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{outputLevels.name} noise per slice"))
    chart.SetTitle("Noise level per slice")
    chart.SetXAxisTitle("position along the slice axis (mm)")
    chart.SetYAxisTitle("noise level (Donoho estimate)")
    for levels, marker in ((inputLevels, slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle),
                           (outputLevels, slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)):
        chart.AddAndObservePlotSeriesNodeID(_addSeries(scene, levels, marker).GetID())
    return chart


def _addSeries(scene, levels: NoiseLevels, marker: int):
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{levels.name} noise per slice"))
    for name, values in (("position (mm)", levels.positions), ("noise level", levels.levels)):
        column = vtk.vtkDoubleArray()
        column.SetName(name)
        for value in values:
            column.InsertNextValue(float(value))
        table.AddColumn(column)
    # Not the volume's own name, which slicer.util.getNode would then find first.
    series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{levels.name} noise level"))
    series.SetAndObserveTableNodeID(table.GetID())
    series.SetXColumnName("position (mm)")
    series.SetYColumnName("noise level")
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series.SetMarkerStyle(marker)
    series.SetUniqueColor()
    return series
