"""Static checks of the module panel: code, .ui file and parameter node agree.

Slicer cannot run here, so a renamed widget or an unbound parameter would only show up when a
user opens the module; these checks read CycleINR.py and CycleINR.ui as text instead.
"""

import ast
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

MODULE = Path(__file__).resolve().parents[1] / "CycleINR"
SOURCE = (MODULE / "CycleINR.py").read_text(encoding="utf-8")
UI = ElementTree.parse(MODULE / "Resources" / "UI" / "CycleINR.ui").getroot()

# The widget classes that Slicer's parameter node GUI connectors accept for each annotation
# (slicer/parameterNodeWrapper/guiConnectors.py matches the exact class).
CONNECTABLE = {
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "bool": {"QCheckBox"},
    "str": {"QLineEdit"},
    "pathlib.Path": {"ctkPathLineEdit"},
    "vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"},
    "enum": {"QComboBox"},
}


def widgets() -> dict:
    return {widget.get("name"): widget for widget in UI.iter("widget")}


def parameters() -> dict:
    """Name -> annotation source of the fields of the @parameterNodeWrapper class."""
    tree = ast.parse(SOURCE)
    wrapper = next(node for node in tree.body if isinstance(node, ast.ClassDef)
                   and any(ast.unparse(decorator) == "parameterNodeWrapper" for decorator in node.decorator_list))
    return {field.target.id: ast.unparse(field.annotation) for field in wrapper.body if isinstance(field, ast.AnnAssign)}


def enums() -> set:
    tree = ast.parse(SOURCE)
    return {node.name for node in tree.body if isinstance(node, ast.ClassDef)
            and any(ast.unparse(base) == "enum.Enum" for base in node.bases)}


def bindings() -> dict:
    """Parameter name -> widget, from the SlicerParameterName dynamic properties of the .ui."""
    bound = {}
    for widget in UI.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                name = prop.find("string").text
                assert name not in bound, f"parameter {name} is bound to two widgets"
                bound[name] = widget
    return bound


def kind(annotation: str) -> str:
    bare = re.sub(r"^Annotated\[(\w[\w.]*),.*\]$", r"\1", annotation)
    return "enum" if bare in enums() else bare


def test_every_widget_the_code_uses_exists_in_the_ui():
    used = set(re.findall(r"self\.ui\.(\w+)", SOURCE))
    assert used, "the widget code uses no widget from the .ui"
    assert used - set(widgets()) == set()


def test_every_parameter_is_bound_to_a_widget_that_can_show_it():
    fields, bound = parameters(), bindings()
    assert set(fields) == set(bound), "parameters and SlicerParameterName properties differ"
    for name, annotation in fields.items():
        widget_class = bound[name].get("class")
        assert widget_class in CONNECTABLE[kind(annotation)], f"{name}: {annotation} cannot bind to {widget_class}"


def test_the_panel_is_connected_to_the_parameter_node():
    """Calls in the code, not words in a comment: the tag connectGui returns is what
    disconnectGui is given."""
    nodes = list(ast.walk(ast.parse(SOURCE)))
    assignments = {ast.unparse(node) for node in nodes if isinstance(node, ast.Assign)}
    calls = {ast.unparse(node) for node in nodes if isinstance(node, ast.Call)}
    assert "self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)" in assignments
    assert "self._parameterNode.disconnectGui(self._parameterNodeGuiTag)" in calls


def test_non_standard_widget_classes_are_declared():
    declared = {custom.find("class").text for custom in UI.iter("customwidget")}
    used = {widget.get("class") for widget in UI.iter("widget")}
    assert {name for name in used if not name.startswith("Q")} <= declared


def test_node_selectors_get_the_scene():
    receivers = {connection.find("receiver").text for connection in UI.iter("connection")
                 if connection.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    selectors = {name for name, widget in widgets().items() if widget.get("class") == "qMRMLNodeComboBox"}
    assert selectors and selectors <= receivers
