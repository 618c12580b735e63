"""The dock widget with a SAM 2 model (pytest-qt, a real napari viewer): it runs a ``Sam2Session``, whose memory
carries a box through the volume and whose corrections re-propagate onward. Run under a display:
`xvfb-run -a pytest -m qt tests/napari/test_widget_sam2.py`.

The model is a tiny SAM 2 with random weights (object-presence head raised): the assertions are on the wiring (which
session, which slices painted, what the status says), not on segmentation quality.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from medseg.backbones.sam2 import build_sam2_components
from medseg.data.dicom import write_dicom_series
from medseg.inference.loaded import LoadedModel

pytestmark = pytest.mark.qt

TIMEOUT_MS = 180_000
TINY = {"embed_dim": 16, "stages": [1, 1, 2, 1], "global_att_blocks": [3], "num_heads": 1}


@pytest.fixture
def tiny_sam2() -> LoadedModel:
    torch.manual_seed(0)
    model = build_sam2_components("sam2_hiera_t", pretrained=False, img_size=64, arch=TINY).model.eval()
    with torch.no_grad():
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)
    return LoadedModel(model=model, kind="promptable", source="tiny sam2")


def test_segment_volume_then_a_correction_with_a_sam2_model(make_napari_viewer, qtbot, blobs, tiny_sam2):
    from medseg.inference.propagate import PropagationConfig
    from medseg.inference.sam2_session import Sam2Session
    from medseg.napari.widget import SegmentationWidget

    viewer = make_napari_viewer()
    volume, _ = blobs
    viewer.add_image(volume, name="blobs", rgb=False)
    viewer.dims.order = (2, 0, 1)
    _, widget = viewer.window.add_plugin_dock_widget("medseg", "Interactive segmentation")
    assert isinstance(widget, SegmentationWidget)
    widget.use_model(tiny_sam2)

    def wait() -> None:
        qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
        assert widget.last_error == ""

    viewer.dims.set_point(2, 1)
    i0, j0, i1, j1 = 10, 15, 34, 33
    corners = [[i0, j0, 1], [i0, j1, 1], [i1, j1, 1], [i1, j0, 1]]
    viewer.layers["blobs boxes"].add_rectangles(np.array(corners, dtype=float))
    widget._session().propagation = PropagationConfig(axis=2, min_iou=None, min_area=None, max_area=None)
    widget.buttons[3].click()  # Segment volume
    wait()
    assert isinstance(widget.session, Sam2Session)
    labels = viewer.layers["blobs labels"]
    assert all(labels.data[:, :, k].any() for k in range(3)) and "slices 0-2" in widget.status.text()

    before = labels.data[:, :, :2].copy()
    viewer.dims.set_point(2, 2)
    widget.point_combo.setCurrentText("negative")
    viewer.layers["blobs points"].add(np.array([[20.0, 20.0, 2.0]]))
    widget.buttons[3].click()  # a correction on slice 2: only slice 2 onward is replaced
    wait()
    assert np.array_equal(labels.data[:, :, :2], before)
    assert sorted(widget.session._trackers[1].outputs["cond_frame_outputs"]) == [1, 2]


def test_the_layers_affine_reaches_the_sam2_session_so_a_dicom_series_and_its_nifti_get_the_same_masks(
    make_napari_viewer, qtbot, blobs, tiny_sam2, tmp_path
):
    """Both files of one scan opened through the reader (the DICOM series stores x and y the other way): the widget
    hands each layer's ``metadata["affine"]`` to its ``Sam2Session``, whose frames are then the same RAS slices, so
    the same box in world space paints the same world voxels."""
    from napari.layers import Image

    from medseg.inference.sam2_session import Sam2Session
    from medseg.napari.reader import read_volume

    affine = np.array([[-0.8, 0, 0, 30.0], [0, -0.8, 0, 12.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
    volume = np.round(blobs[0])
    dicom = write_dicom_series(volume, affine, tmp_path / "scan_dicom")
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.as_closest_canonical(nib.Nifti1Image(volume, affine)), nifti)
    viewer = make_napari_viewer()
    layers = {}
    for name, path in (("dicom", dicom), ("nifti", nifti)):
        data, kwargs, _ = read_volume(path)[0]
        layers[name] = viewer.add_layer(Image(data, **{**kwargs, "name": name}))
    assert np.array_equal(layers["nifti"].data, layers["dicom"].data[::-1, ::-1])
    viewer.dims.order = (2, 0, 1)
    _, widget = viewer.window.add_plugin_dock_widget("medseg", "Interactive segmentation")
    widget.use_model(tiny_sam2)
    viewer.dims.set_point(2, layers["dicom"].data_to_world((0, 0, 1))[2])
    boxes = {"dicom": (10, 14, 34, 34), "nifti": (63 - 34, 63 - 34, 63 - 10, 63 - 14)}  # one box in world space
    for name, (i0, j0, i1, j1) in boxes.items():
        widget.image_combo.setCurrentText(name)
        assert widget.position() == (2, 1)
        corners = [[i0, j0, 1], [i0, j1, 1], [i1, j1, 1], [i1, j0, 1]]
        viewer.layers[f"{name} boxes"].add_rectangles(np.array(corners, dtype=float))
        widget.intensity_combo.setCurrentText("mr")
        widget.buttons[2].click()  # Segment slice
        qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
        assert widget.last_error == "" and isinstance(widget.session, Sam2Session)
        assert np.allclose(widget.session.slicing.orientation.to_oriented, _to_ras(layers[name].metadata["affine"]))
        assert widget.session.labels is viewer.layers[f"{name} labels"].data  # painted into the layer itself
    dicom_labels, nifti_labels = (viewer.layers[f"{name} labels"].data for name in boxes)
    assert dicom_labels[:, :, 1].any() and not dicom_labels[:, :, [0, 2]].any()
    np.testing.assert_array_equal(nifti_labels, dicom_labels[::-1, ::-1])


def _to_ras(affine: np.ndarray) -> np.ndarray:
    """nibabel's file axis -> RAS axis and flip of ``affine``, computed independently of medseg."""
    return ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))
