"""napari plugin of medseg (npe2 manifest ``napari.yaml``, installed with the ``[napari]`` extra).

- :mod:`~medseg.napari.reader`: NIfTI files and DICOM series folders as image layers in world millimetres;
- :mod:`~medseg.napari.writer`: labels layers as NIfTI on the source image's grid;
- :mod:`~medseg.napari.widget`: the dock widget, a thin layer over :mod:`medseg.inference.session` (the Qt-free
  interactive segmentation logic: embeddings, clicks, propagation, tested without a display).

Nothing here imports napari or Qt at package import: the reader and writer work without them.
"""

from __future__ import annotations

__all__: list[str] = []
