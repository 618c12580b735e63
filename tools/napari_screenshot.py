"""Screenshot of the napari plugin after segmenting a slice, for the README (needs a display: run under xvfb-run).

It opens a scan through the plugin's reader (default: the MNI152 T1 template bundled with nilearn, written to a
temporary NIfTI; or ``--image`` for a NIfTI file / DICOM series), docks the widget through the plugin manifest, loads
the built-in LiteMedSAM, draws a box on the middle axial slice (``--box``, default: the bounding box of the voxels
above the slice's mean), presses *Segment slice* and saves the whole window. Usage::

    xvfb-run -a env QT_QPA_PLATFORM=xcb .venv/bin/python tools/napari_screenshot.py --out docs/images/napari_widget.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def mni_nifti(folder: Path) -> Path:
    from nilearn.datasets import load_mni152_template

    path = folder / "mni152_t1.nii.gz"
    load_mni152_template(resolution=1).to_filename(path)
    return path


def wait(app, widget, timeout: float = 900.0) -> None:
    start = time.monotonic()
    while widget.busy:
        app.processEvents()
        time.sleep(0.05)
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"the widget's job did not finish in {timeout:.0f} s")
    if widget.last_error:
        raise RuntimeError(widget.last_error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/napari_widget.png"))
    parser.add_argument("--image", type=Path, help="NIfTI file or DICOM series folder (default: MNI152 template)")
    parser.add_argument("--box", type=int, nargs=4, metavar=("I0", "J0", "I1", "J1"), help="box on the middle slice")
    parser.add_argument("--size", type=int, nargs=2, default=(1400, 800), help="window width and height (px)")
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from medseg.inference.sources import load_litemedsam

    with tempfile.TemporaryDirectory() as tmp:
        image_path = args.image or mni_nifti(Path(tmp))
        viewer = napari.Viewer(show=True)
        viewer.window._qt_window.resize(*args.size)
        (image,) = viewer.open(str(image_path), plugin="medseg")
        viewer.dims.order = (2, 0, 1)  # slider over the last array axis (axial for RAS volumes)
        middle = image.data.shape[2] // 2
        viewer.dims.set_point(2, image.data_to_world((0, 0, middle))[2])
        _, widget = viewer.window.add_plugin_dock_widget("medseg", "Interactive segmentation")
        app = QApplication.instance()
        widget.use_model(load_litemedsam("cpu"))
        slice_2d = np.asarray(image.data[:, :, middle])
        if args.box is None:
            rows, cols = np.nonzero(slice_2d > slice_2d.mean())
            box = (rows.min(), cols.min(), rows.max(), cols.max())
        else:
            box = tuple(args.box)
        i0, j0, i1, j1 = box
        corners = [[i0, j0, middle], [i0, j1, middle], [i1, j1, middle], [i1, j0, middle]]
        widget.boxes_layer.add_rectangles(np.asarray(corners, dtype=float))
        widget.segment_slice()
        wait(app, widget)
        viewer.reset_view()
        app.processEvents()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(args.out), canvas_only=False)
        print(f"{args.out}: box {box} on slice {middle}; {widget.status.text()}")
        viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
