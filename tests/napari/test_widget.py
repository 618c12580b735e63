"""The dock widget in a real napari viewer (pytest-qt); run under a display: `xvfb-run -a pytest -m qt`."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medseg.inference.loaded import LoadedModel

pytestmark = pytest.mark.qt

TIMEOUT_MS = 180_000  # LiteMedSAM's encoder on a loaded shared CPU


@pytest.fixture
def viewer_with_widget(make_napari_viewer, blobs):
    """A viewer showing the blob volume sliced along axis 2, and the widget opened through the plugin manifest."""
    from medseg.napari.widget import SegmentationWidget

    viewer = make_napari_viewer()
    volume, _ = blobs
    viewer.add_image(volume, name="blobs", rgb=False, scale=(0.8, 0.8, 2.5), translate=(10.0, -5.0, 30.0))
    viewer.dims.order = (2, 0, 1)  # the slider walks axis 2 (axial), as for a RAS volume
    _, widget = viewer.window.add_plugin_dock_widget("medseg", "Interactive segmentation")
    assert isinstance(widget, SegmentationWidget)
    return viewer, widget


def go_to_slice(viewer, index: int) -> None:
    layer = viewer.layers["blobs"]
    viewer.dims.set_point(2, layer.data_to_world((0, 0, index))[2])


def rectangle(index: int, box: tuple[int, int, int, int]) -> np.ndarray:
    i0, j0, i1, j1 = box
    return np.array([[i0, j0, index], [i0, j1, index], [i1, j1, index], [i1, j0, index]], dtype=float)


def wait(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert widget.last_error == ""


def test_box_and_segment_slice_fill_the_labels_layer(
    viewer_with_widget, qtbot, litemedsam_loaded, blobs, tight_box, dice
):
    viewer, widget = viewer_with_widget
    _, truth = blobs
    labels, boxes = viewer.layers["blobs labels"], viewer.layers["blobs boxes"]
    assert np.allclose(labels.scale, (0.8, 0.8, 2.5)) and np.allclose(boxes.translate, (10.0, -5.0, 30.0))
    widget.use_model(litemedsam_loaded)
    go_to_slice(viewer, 1)
    assert widget.position() == (2, 1)
    boxes.add_rectangles(rectangle(1, tight_box(truth[:, :, 1] == 1)))
    widget.buttons[2].click()  # Segment slice
    wait(qtbot, widget)
    assert dice(labels.data[:, :, 1] == 1, truth[:, :, 1] == 1) > 0.8
    assert not labels.data[:, :, [0, 2]].any()
    assert "label 1 on slice 1" in widget.status.text()


def test_volume_next_object_live_points_and_save(viewer_with_widget, qtbot, bright_in_box, blobs, tmp_path, dice):
    viewer, widget = viewer_with_widget
    _, truth = blobs
    widget.use_model(LoadedModel(bright_in_box, "promptable", source="stand-in"))
    go_to_slice(viewer, 1)
    viewer.layers["blobs boxes"].add_rectangles(rectangle(1, (10, 15, 34, 33)))
    widget.buttons[3].click()  # Segment volume
    wait(qtbot, widget)
    labels = viewer.layers["blobs labels"]
    assert dice(labels.data == 1, truth == 1) > 0.9 and labels.data[:, :, [0, 2]].any()  # every slice

    widget.buttons[4].click()  # Next object: label 2, prompts cleared
    assert widget.label_spin.value() == 2 and len(viewer.layers["blobs boxes"].data) == 0
    widget.live_check.setChecked(True)
    widget.point_combo.setCurrentText("positive")
    viewer.layers["blobs points"].add(np.array([[48.0, 48.0, 1.0]]))  # live: the click segments the slice
    wait(qtbot, widget)
    assert dice(labels.data[:, :, 1] == 2, truth[:, :, 1] == 2) > 0.6  # the stand-in's 9 x 9 click window
    assert list(viewer.layers["blobs points"].features["prompt"]) == ["positive"]

    written = widget.save(str(tmp_path / "blobs_labels.nii.gz"))
    saved = nib.load(written[0])
    expected = np.diag([0.8, 0.8, 2.5, 1.0])
    expected[:3, 3] = (10.0, -5.0, 30.0)
    assert np.allclose(saved.affine, expected) and np.array_equal(np.asarray(saved.dataobj), labels.data)


def test_mistakes_are_reported_in_the_status_line(viewer_with_widget, qtbot, bright_in_box, tmp_path):
    viewer, widget = viewer_with_widget
    widget.buttons[2].click()
    assert "load a model first" in widget.last_error
    widget.use_model(LoadedModel(bright_in_box, "promptable", source="stand-in"))
    widget.buttons[2].click()
    assert "no box or point on slice" in widget.last_error
    viewer.dims.ndisplay = 3
    widget.buttons[2].click()
    assert "2-D view" in widget.last_error
    viewer.dims.ndisplay = 2
    widget.model_edit.setText(str(tmp_path))  # an empty folder: neither a run nor a release
    widget.buttons[0].click()  # Load model, in the background
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert "neither a run folder" in widget.last_error


def test_the_layers_affine_reaches_the_session(viewer_with_widget, bright_in_box, blobs):
    """A layer the reader made carries its affine in ``metadata``: the session slices the RAS grid (here the file's
    x and y run the other way, so the model's slice is the file's flipped); a layer without one is sliced as given."""
    from medseg.inference.session import SegmentationSession

    viewer, widget = viewer_with_widget
    widget.use_model(LoadedModel(bright_in_box, "promptable", source="stand-in"))
    go_to_slice(viewer, 1)
    plain = widget._session()
    assert isinstance(plain, SegmentationSession) and np.array_equal(plain.slice(1), plain.prepared[:, :, 1])
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS, as a DICOM series is stored
    volume, _ = blobs
    viewer.add_image(volume, name="lps", rgb=False, metadata={"affine": affine})
    widget.image_combo.setCurrentText("lps")
    session = widget._session()
    assert session is not plain and session.slicing.grid_axis == 2 and not session.slicing.reversed
    assert np.array_equal(session.slice(1), plain.slice(1)[::-1, ::-1])  # the model sees the RAS slice
