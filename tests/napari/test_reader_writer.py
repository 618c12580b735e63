"""The reader gives layers in world millimetres; the writer puts labels back on the source grid exactly."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
from napari.layers import Image, Labels

from medseg.data.dicom import write_dicom_series
from medseg.errors import ConfigError, ReaderError
from medseg.inference.recipe import SliceRecipe
from medseg.inference.session import SegmentationSession
from medseg.napari.reader import case_name, napari_get_reader, read_volume
from medseg.napari.writer import write_labels

AXIS_ALIGNED = np.array([[-0.8, 0, 0, 30.0], [0, -0.8, 0, 12.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])


def image_layer(layer_data) -> Image:
    data, kwargs, kind = layer_data
    assert kind == "image"
    return Image(data, **kwargs)


def labels_like(image: Image, data: np.ndarray) -> Labels:
    """A labels layer as the widget makes it: the image's transform and metadata."""
    return Labels(data, scale=image.scale, translate=image.translate, rotate=image.rotate, metadata=image.metadata)


def test_nifti_layer_scale_is_the_spacing_and_voxels_land_on_the_affine(nifti_case, blobs):
    path, affine = nifti_case
    assert napari_get_reader(str(path)) is read_volume
    (layer_data,) = read_volume(str(path))
    layer = image_layer(layer_data)
    assert layer.name == "case_07" and layer.data.shape == blobs[0].shape
    assert np.allclose(layer.scale, np.linalg.norm(affine[:3, :3], axis=0))
    assert np.allclose(layer.translate, affine[:3, 3])
    assert np.allclose(layer.metadata["affine"], affine)
    for voxel in [(0, 0, 0), (63, 5, 2), (10, 40, 1)]:
        assert np.allclose(layer.data_to_world(voxel), (affine @ [*voxel, 1])[:3])
    assert np.array_equal(layer.data, blobs[0])


def test_reader_declines_what_it_cannot_read(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path / "empty")) is None
    truncated = tmp_path / "broken.nii.gz"
    truncated.write_bytes(b"\x1f\x8b\x08\x00 truncated")
    with pytest.raises(ReaderError, match=r"broken\.nii\.gz"):
        read_volume(truncated)


def test_writer_keeps_the_source_header_geometry(nifti_case, blobs, tmp_path):
    path, _ = nifti_case
    source = nib.load(path)
    image = image_layer(read_volume(path)[0])
    labels = labels_like(image, blobs[1])
    data, meta, kind = labels.as_layer_data_tuple()
    assert kind == "labels"
    (written,) = write_labels(tmp_path / "out" / "case_07_labels", data, meta)
    assert written.endswith("case_07_labels.nii.gz")
    out = nib.load(written)
    assert np.array_equal(out.get_sform(), source.get_sform()) and int(out.header["sform_code"]) == 2
    assert np.array_equal(out.get_qform(), source.get_qform()) and int(out.header["qform_code"]) == 1
    assert out.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(out.dataobj), blobs[1])


def test_dicom_series_lines_up_with_the_nifti_of_the_same_scan(tmp_path):
    volume = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4) * 3.0 - 100.0
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume, AXIS_ALIGNED), nifti)
    folder = write_dicom_series(volume, AXIS_ALIGNED, tmp_path / "scan_dicom")
    assert napari_get_reader(str(folder)) is read_volume and case_name(folder) == "scan_dicom"
    from_nifti, from_dicom = (image_layer(read_volume(p)[0]) for p in (nifti, folder))
    assert np.allclose(sorted(from_dicom.scale), sorted(from_nifti.scale))
    for voxel in [(0, 0, 0), (5, 4, 3), (2, 1, 2)]:
        world = from_nifti.data_to_world(voxel)
        other = np.rint(from_dicom.world_to_data(world)).astype(int)
        assert np.allclose(from_dicom.data_to_world(other), world, atol=1e-4)
        assert from_dicom.data[tuple(other)] == from_nifti.data[voxel]


def test_a_session_on_the_layers_affine_gives_a_dicom_series_and_its_ras_nifti_the_same_slices(
    tmp_path, blobs, bright_in_box
):
    """What the reader hands the widget (the layer's data and ``metadata["affine"]``) is what the session needs to
    slice a DICOM series (LPS) and the NIfTI of the same scan stored in RAS order on one grid: the model gets the same
    slices, and the labels land on the same world voxels."""
    volume = np.round(blobs[0])
    folder = write_dicom_series(volume, AXIS_ALIGNED, tmp_path / "scan_dicom")
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.as_closest_canonical(nib.Nifti1Image(volume, AXIS_ALIGNED)), nifti)
    from_dicom, from_nifti = (image_layer(read_volume(p)[0]) for p in (folder, nifti))
    assert np.array_equal(from_nifti.data, from_dicom.data[::-1, ::-1])  # x and y stored the other way
    sessions = [
        SegmentationSession(bright_in_box, layer.data, recipe=SliceRecipe("mr"), affine=layer.metadata["affine"])
        for layer in (from_dicom, from_nifti)
    ]
    for k in range(volume.shape[2]):
        assert np.array_equal(sessions[0].slice(k), sessions[1].slice(k))
    sessions[0].segment_slice(1, box=(10, 14, 34, 34))
    sessions[1].segment_slice(1, box=(63 - 34, 63 - 34, 63 - 10, 63 - 14))
    assert sessions[0].labels.any()
    np.testing.assert_array_equal(sessions[1].labels, sessions[0].labels[::-1, ::-1])
    plain = SegmentationSession(bright_in_box, from_dicom.data, recipe=SliceRecipe("mr"))
    assert not np.array_equal(plain.slice(1), sessions[0].slice(1))  # without the affine: the file's own slice


def test_labels_of_a_dicom_image_round_trip_its_affine(tmp_path):
    volume = np.zeros((6, 5, 4), np.float32)
    folder = write_dicom_series(volume, AXIS_ALIGNED, tmp_path / "series")
    image = image_layer(read_volume(folder)[0])
    labels = np.zeros(volume.shape, np.uint16)
    labels[1:3, 2:4, 1] = 300  # above 255: stored as uint16
    (written,) = write_labels(tmp_path / "series_labels.nii.gz", *labels_like(image, labels).as_layer_data_tuple()[:2])
    out = nib.load(written)
    assert np.array_equal(out.affine, image.metadata["affine"].astype(np.float32))  # NIfTI stores float32 srows
    assert out.get_data_dtype() == np.uint16 and np.array_equal(np.asarray(out.dataobj), labels)
    reread = image_layer(read_volume(written)[0])
    assert np.allclose(reread.scale, image.scale) and np.allclose(reread.translate, image.translate)
    assert np.allclose(reread.rotate, image.rotate)


def test_labels_without_metadata_use_the_layer_transform(tmp_path):
    labels = Labels(np.ones((3, 4, 5), np.uint8), scale=(0.5, 0.6, 3.0), translate=(1.0, -2.0, 7.5))
    (written,) = write_labels(tmp_path / "plain.nii", *labels.as_layer_data_tuple()[:2])
    expected = np.diag([0.5, 0.6, 3.0, 1.0])
    expected[:3, 3] = [1.0, -2.0, 7.5]
    assert np.allclose(nib.load(written).affine, expected)


def test_writer_refuses_a_2d_layer(tmp_path):
    with pytest.raises(ConfigError, match="3-D label volumes"):
        write_labels(tmp_path / "flat.nii.gz", np.zeros((4, 4), np.uint8), {})


def test_a_single_dicom_file_reads_as_one_slice_at_its_position(tmp_path):
    volume = np.arange(6 * 5 * 3, dtype=np.float32).reshape(6, 5, 3)
    folder = write_dicom_series(volume, AXIS_ALIGNED, tmp_path / "series")
    first = sorted(folder.glob("*.dcm"))[0]
    assert napari_get_reader(str(first)) is read_volume
    (layer_data,) = read_volume(first)
    layer = image_layer(layer_data)
    assert layer.data.shape[2] == 1 and layer.data.size == 6 * 5
    whole = image_layer(read_volume(folder)[0])
    for voxel in [(0, 0, 0), (5, 4, 0), (2, 3, 0)]:  # the slice's voxels are where the series puts them
        world = layer.data_to_world(voxel)
        assert whole.data[tuple(np.rint(whole.world_to_data(world)).astype(int))] == layer.data[voxel]


def test_a_dcm_without_the_dicom_preamble_is_declined(tmp_path):
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\0" * 200)
    assert napari_get_reader(str(fake)) is None


@pytest.fixture
def napari_settings(monkeypatch):
    """napari's settings for this test only (kept in memory: the user's settings file is neither read nor written),
    with the installed plugins discovered as napari discovers them at start-up."""
    import napari.settings
    from napari.settings import NapariSettings
    from npe2 import PluginManager

    settings = NapariSettings(config_path=None)
    monkeypatch.setattr(napari.settings, "_SETTINGS", settings)
    PluginManager.instance().discover()
    return settings


def test_viewer_opens_a_nifti_without_naming_the_plugin(nifti_case, napari_settings):
    """napari's own open path (``ViewerModel.open``, what ``viewer.open`` runs, without Qt). ``viewer.open(path)``
    defaults to ``plugin="napari"`` (napari's builtin reader); ``plugin=None`` picks the reader by the preferences
    (``extension2reader``, the README's one-time setting, or the GUI's "remember" choice), asking while napari's
    builtin reader also claims ``.nii.gz``. With medseg preferred, the layer is medseg's, in mm."""
    from napari.components import ViewerModel
    from napari.errors import MultipleReaderError
    from napari.plugins._npe2 import get_readers

    path, affine = nifti_case
    readers = get_readers(str(path))
    assert "medseg" in readers
    viewer = ViewerModel()
    if len(readers) > 1:
        with pytest.raises(MultipleReaderError, match="medseg"):
            viewer.open(str(path), plugin=None)
    napari_settings.plugins.extension2reader = {"*.nii.gz": "medseg"}
    (layer,) = viewer.open(str(path), plugin=None)
    assert layer.name == "case_07" and np.allclose(layer.metadata["affine"], affine)
    assert np.allclose(layer.scale, np.linalg.norm(affine[:3, :3], axis=0))
    (named,) = viewer.open(str(path), plugin="medseg")
    assert np.array_equal(named.data, layer.data)


def test_npe2_reads_a_dicom_folder_through_the_plugin(tmp_path, napari_settings):
    from npe2 import read

    volume = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    folder = write_dicom_series(volume, AXIS_ALIGNED, tmp_path / "scan")
    ((data, kwargs, kind),) = read([str(folder)], stack=False, plugin_name="medseg")
    assert kind == "image" and kwargs["name"] == "scan" and data.shape == (6, 5, 4)


def test_a_folder_of_several_series_opens_one_layer_per_series(tmp_path):
    """A PACS export keeps several series in one folder: each becomes a layer named by its SeriesDescription."""
    mixed = tmp_path / "export"
    mixed.mkdir()
    volumes = {}
    for index, description in enumerate(("T1 axial", "T2 axial")):
        volume = np.full((6, 5, 4), 10.0 * (index + 1), dtype=np.float32)
        volumes[description] = volume
        series = write_dicom_series(volume, AXIS_ALIGNED, tmp_path / description, series_description=description)
        for file in series.iterdir():
            shutil.copy(file, mixed / f"{index}_{file.name}")
    assert napari_get_reader(str(mixed)) is read_volume
    layers = read_volume(mixed)
    assert [kwargs["name"] for _, kwargs, _ in layers] == ["export [T1 axial]", "export [T2 axial]"]
    for data, kwargs, _ in layers:
        description = kwargs["name"].split("[")[1].rstrip("]")
        np.testing.assert_array_equal(data, volumes[description])
        assert kwargs["metadata"]["series"] is not None
    assert read_volume(tmp_path / "T1 axial")[0][1]["metadata"]["series"] is None  # one series: read as before
