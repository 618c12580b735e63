"""dataset.json names nnU-Net's reorienting reader exactly when nnU-Net would otherwise see other axes than medseg."""

from __future__ import annotations

import json

import numpy as np
import pytest
from monai.transforms import Orientation

from medseg.data.formats import load_dataset_info
from medseg.data.io import load_image
from medseg.data.nnunet_reader import READER_KEY, REORIENTING_READER
from medseg.data.prepare.synthetic import build

nnunet_io = pytest.importorskip("nnunetv2.imageio.reader_writer_registry", reason="needs the [nnunet] extra")


def test_mixed_orientations_get_the_reader_that_sees_medseg_spacing(tmp_path):
    root = build(tmp_path, num_train=4, num_test=0, shape=(12, 10, 8), oblique=False)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta[READER_KEY] == REORIENTING_READER
    reader_class = nnunet_io.determine_reader_writer_from_dataset_json(meta, str(root / "imagesTr" / "x.nii.gz"))
    assert reader_class.__name__ == REORIENTING_READER
    for case in load_dataset_info(root).training:
        image = Orientation(axcodes="RAS")(load_image(case.images[0]))  # what medseg's preprocessing sees
        data, properties = reader_class().read_images([str(case.images[0])])
        # nnU-Net keeps SimpleITK's (z, y, x) order: reversed, its spacing and shape are medseg's RAS ones.
        np.testing.assert_allclose(properties["spacing"][::-1], image.pixdim.numpy(), rtol=1e-5)
        assert data.shape[1:][::-1] == tuple(image.shape[1:])


def test_an_all_ras_dataset_keeps_nnunets_default_reader(tmp_path):
    root = build(tmp_path, num_train=2, num_test=1, shape=(12, 10, 8), reorient=False, oblique=False)
    assert READER_KEY not in json.loads((root / "dataset.json").read_text())
