"""The layers the widget adds next to an image: prompts (Points, Shapes) and the label map, in the image's frame.

Each gets the image's ``scale``/``translate``/``rotate`` (:mod:`medseg.napari.geometry`), so its data coordinates are
the image's voxel indices, what :mod:`medseg.napari.prompts` reads, and the label map gets the image's ``metadata``
(its affine and source file), what :mod:`medseg.napari.writer` restores. Building them needs napari, not Qt.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from napari.layers import Image, Labels, Points, Shapes

__all__ = ["POINT_COLORS", "boxes_layer", "labels_layer", "layer_name", "points_layer"]

POINT_COLORS = {"positive": "lime", "negative": "red"}


def layer_name(image: Image, role: str) -> str:
    """``"<image> points"``, ``"<image> boxes"``, ``"<image> labels"``."""
    return f"{image.name} {role}"


def _frame(image: Image, role: str) -> dict[str, Any]:
    return {"name": layer_name(image, role), "scale": image.scale, "translate": image.translate, "rotate": image.rotate}


def points_layer(image: Image, kind: str = "positive") -> Points:
    """Click prompts; the ``prompt`` feature (``positive``/``negative``, coloured green/red) is ``kind`` by default."""
    return Points(
        np.empty((0, image.ndim)),
        ndim=image.ndim,
        features={"prompt": np.array([], dtype=object)},
        feature_defaults={"prompt": kind},
        face_color="prompt",
        face_color_cycle=POINT_COLORS,
        size=3,
        **_frame(image, "points"),
    )


def boxes_layer(image: Image) -> Shapes:
    """Box prompts: rectangles drawn on a slice."""
    return Shapes(
        ndim=image.ndim, edge_color="yellow", face_color="transparent", edge_width=1, **_frame(image, "boxes")
    )


def labels_layer(image: Image) -> Labels:
    """An empty ``uint16`` label map on the image's grid, carrying its metadata (affine, source) for the writer."""
    return Labels(np.zeros(image.data.shape, np.uint16), metadata=dict(image.metadata), **_frame(image, "labels"))
