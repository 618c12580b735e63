"""The napari dock widget: buttons and layers around a :class:`~medseg.inference.session.SegmentationSession`.

It only wires napari to the session (micro-sam's rule: thin widgets, logic tested without Qt). For the chosen image
layer it adds three layers sharing the image's transform, so their data are the image's voxel indices: ``<image>
points`` (the ``prompt`` feature says ``positive`` or ``negative``; press ``n`` on the layer to switch the next
point's kind), ``<image> boxes`` (rectangles) and ``<image> labels`` (the session's label map itself, saved by the
plugin's writer on the image's grid). The sliced axis and index are napari's current ones; the session gets the
reader's ``metadata["affine"]``, so its model slices the RAS grid as ``medseg predict`` does. Model loading, embedding
and propagation run in background workers (``napari.qt.threading``), so the interface never freezes; embedding
shows its progress slice by slice. With *live* on, adding or moving a prompt re-segments the current slice.

A SAM 2 / MedSAM2 model (an official ``.pt`` file or a fine-tuned SAM 2 run) gets a
:class:`~medseg.inference.sam2_session.Sam2Session` instead, with the same buttons: *Segment volume* carries the object
through the volume with SAM 2's memory, and pressed again on another slice after a correction (a click there), it
re-propagates onward from that slice only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Points, Shapes
from napari.qt.threading import create_worker
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from medseg.errors import ConfigError, MedsegError
from medseg.inference.loaded import LoadedModel
from medseg.inference.recipe import SliceRecipe
from medseg.inference.sam2_frames import is_sam2_model
from medseg.inference.sam2_session import Sam2Session
from medseg.inference.session import SegmentationSession, guess_intensity
from medseg.napari.geometry import sliced_data_axis
from medseg.napari.layers import boxes_layer, labels_layer, layer_name, points_layer
from medseg.napari.prompts import POINT_KINDS, boxes_on_slice, point_labels, points_on_slice
from medseg.napari.writer import write_labels
from medseg.workflows.models import load_model

__all__ = ["SegmentationWidget"]

_FINAL_ACTIONS = {"added", "changed", "removed"}  # napari data events, not the in-progress "adding"/"changing"


class SegmentationWidget(QWidget):
    """Interactive LiteMedSAM-style segmentation of a 3-D image layer: boxes and clicks in, a Labels layer out.

    Attributes:
        viewer: the napari viewer.
        loaded: the model in use (``None`` until loaded).
        session: the current :class:`SegmentationSession`, or :class:`Sam2Session` for a SAM 2 model (rebuilt when the
            image, axis or intensity changes).
        busy: a background job is running.
        last_error: the message of the last failed job (also shown in the status line).
    """

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.loaded: LoadedModel | None = None
        self.session: SegmentationSession | None = None
        self.busy = False
        self.last_error = ""
        self._worker = None
        self._pending = False
        self._hooked: set[int] = set()
        self._build()
        self.viewer.layers.events.inserted.connect(self._refresh_images)
        self.viewer.layers.events.removed.connect(self._refresh_images)
        self._refresh_images()

    # --- interface ----------------------------------------------------------------------------------------------

    def _button(self, text: str, slot: Callable[[], Any], tip: str) -> QPushButton:
        button = QPushButton(text)
        button.setToolTip(tip)
        button.clicked.connect(lambda *_: slot())
        return button

    def _build(self) -> None:
        self.image_combo = QComboBox()
        self.image_combo.currentTextChanged.connect(lambda *_: self._select_image())
        self.model_edit = QLineEdit("litemedsam")
        self.model_edit.setToolTip(
            "litemedsam (built-in, zero-shot), a run folder / release folder path, or a SAM 2.1 / MedSAM2 .pt file"
        )
        browse = self._button("…", self._browse_model, "choose a run or release folder")
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_edit)
        model_row.addWidget(browse)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["cpu", "cuda"])
        self.intensity_combo = QComboBox()
        self.intensity_combo.addItems(["auto", "ct", "mr", "none"])
        self.intensity_combo.setToolTip("CT window (40/400 HU), MR percentiles, or none (already 0-255)")
        self.point_combo = QComboBox()
        self.point_combo.addItems(list(POINT_KINDS))
        self.point_combo.currentTextChanged.connect(self._set_point_kind)
        self.label_spin = QSpinBox()
        self.label_spin.setRange(1, 65535)
        self.label_spin.valueChanged.connect(self._set_label)
        self.live_check = QCheckBox("live: segment the slice when prompts change")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.status = QLabel("load a model, then draw a box or click on the image")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("image", self.image_combo)
        form.addRow("model", model_row)
        form.addRow("device", self.device_combo)
        form.addRow("intensity", self.intensity_combo)
        form.addRow("next point", self.point_combo)
        form.addRow("label", self.label_spin)
        self.buttons = [
            self._button("Load model", self.load_model, "build the chosen model (background)"),
            self._button("Compute embeddings", self.compute_embeddings, "run the encoder on every slice"),
            self._button("Segment slice", self.segment_slice, "box/points on this slice -> mask"),
            self._button("Segment volume", self.segment_volume, "propagate this slice's box through the volume"),
            self._button("Next object", self.next_object, "commit the object; next label value"),
            self._button("Clear object", self.clear_object, "erase the current label value"),
            self._button("Save labels…", self.save, "write the label map as NIfTI on the image's grid"),
        ]
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        for button in self.buttons:
            layout.addWidget(button)
        layout.addWidget(self.live_check)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Run or release folder")
        if folder:
            self.model_edit.setText(folder)

    # --- layers -------------------------------------------------------------------------------------------------

    def _refresh_images(self, *_: Any) -> None:
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image) and layer.ndim == 3]
        current = self.image_combo.currentText()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)
        if self.image_combo.currentText() != current:
            self._select_image()

    @property
    def image_layer(self) -> Image | None:
        name = self.image_combo.currentText()
        found = [layer for layer in self.viewer.layers if layer.name == name and isinstance(layer, Image)]
        return found[0] if found else None

    def _layer(self, role: str, kind: type, make: Callable[[Image], Any]):
        image = self.image_layer
        name = layer_name(image, role)
        found = [layer for layer in self.viewer.layers if layer.name == name and isinstance(layer, kind)]
        layer = found[0] if found else self.viewer.add_layer(make(image))
        if not found:
            self.viewer.layers.selection.active = image
        if role != "labels" and id(layer) not in self._hooked:  # once per layer, even one an earlier widget made
            self._hooked.add(id(layer))
            layer.events.data.connect(self._on_prompts_changed)
            if role == "points":
                layer.bind_key("n", lambda _layer: self._toggle_point_kind(), overwrite=True)
        return layer

    @property
    def points_layer(self) -> Points:
        return self._layer("points", Points, lambda image: points_layer(image, self.point_combo.currentText()))

    @property
    def boxes_layer(self) -> Shapes:
        return self._layer("boxes", Shapes, boxes_layer)

    @property
    def labels_layer(self) -> Labels:
        return self._layer("labels", Labels, labels_layer)

    def _select_image(self) -> None:
        self.session = None
        if self.image_layer is not None:
            self.points_layer, self.boxes_layer, self.labels_layer  # noqa: B018 - create the prompt layers

    def _set_point_kind(self, kind: str) -> None:
        if self.image_layer is not None:
            self.points_layer.feature_defaults = {"prompt": kind}

    def _toggle_point_kind(self) -> None:
        other = POINT_KINDS[1 - POINT_KINDS.index(self.point_combo.currentText())]
        self.point_combo.setCurrentText(other)

    def _set_label(self, value: int) -> None:
        if self.session is not None and self.session.label != value:
            self.session.select_object(value)

    # --- session ------------------------------------------------------------------------------------------------

    def position(self) -> tuple[int, int]:
        """The image's data axis under napari's slider and the current slice index along it."""
        image = self._require_image()
        if not self.viewer.dims.not_displayed:
            raise ConfigError("prompts are drawn on a slice: switch napari to the 2-D view (ndisplay 2) first.")
        world_axis = self.viewer.dims.not_displayed[-1] - (self.viewer.dims.ndim - 3)
        axis = sliced_data_axis(image.rotate, world_axis)
        point = image.world_to_data(self.viewer.dims.point[-3:])
        index = int(np.clip(np.rint(point[axis]), 0, image.data.shape[axis] - 1))
        return axis, index

    def _require_image(self) -> Image:
        if self.image_layer is None:
            raise ConfigError("open a 3-D image first (File > Open: a NIfTI file or a DICOM series folder).")
        return self.image_layer

    def _session(self) -> SegmentationSession | Sam2Session:
        if self.loaded is None:
            raise ConfigError("load a model first (Load model).")
        image = self._require_image()
        axis, _ = self.position()
        volume = np.asarray(image.data)
        intensity = self.intensity_combo.currentText()
        intensity = guess_intensity(volume) if intensity == "auto" else intensity
        affine = image.metadata.get("affine")  # None for a layer the reader did not make: the array as given
        session, kind = self.session, Sam2Session if is_sam2_model(self.loaded.model) else SegmentationSession
        if not isinstance(session, kind) or session.axis != axis or session.recipe.intensity != intensity:
            session = kind(
                self.loaded,
                volume,
                axis=axis,
                recipe=SliceRecipe(intensity),
                labels=self.labels_layer.data,
                cache=session.cache if isinstance(session, kind) else None,
                affine=affine,
            )
            session.select_object(self.label_spin.value())
            self.session = session
        return session

    def _prompts(self, axis: int, index: int) -> dict[str, Any]:
        shape = self._require_image().data.shape
        shapes = self.boxes_layer
        rectangles = [d for d, t in zip(shapes.data, shapes.shape_type) if t == "rectangle"]
        boxes = boxes_on_slice(rectangles, axis, index, shape)
        layer = self.points_layer
        kinds = list(layer.features["prompt"]) if "prompt" in layer.features else None
        points, labels = points_on_slice(layer.data, point_labels(kinds, len(layer.data)), axis, index)
        return {"box": boxes[-1] if boxes else None, "points": points or None, "point_labels": labels or None}

    # --- actions ------------------------------------------------------------------------------------------------

    def use_model(self, loaded: LoadedModel) -> None:
        """Segment with ``loaded`` from now on (what Load model does once the model is built)."""
        if loaded.kind != "promptable":
            raise ConfigError(f"{loaded.source} is a {loaded.kind} model; the widget needs box/point prompts.")
        self.loaded, self.session = loaded, None
        self.status.setText(f"model: {loaded.source}")

    def load_model(self) -> None:
        """Build the model named in the model field (``litemedsam``, or a run/release folder) in the background."""
        spec, device = self.model_edit.text().strip(), self.device_combo.currentText()

        def load() -> LoadedModel:
            return load_model(spec, device)

        self._run(load, self.use_model, f"loading {spec}…")

    def compute_embeddings(self) -> None:
        """Encode every slice along the current axis in the background, with progress (cached per slice)."""
        session = self._guard(self._session)
        if session is not None:
            self._run(session.iter_embeddings, lambda _: self._done("embeddings ready"), "computing embeddings…")

    def segment_slice(self) -> None:
        """Segment the current object on the current slice from the box and points drawn there."""
        self._segment(volume=False)

    def segment_volume(self) -> None:
        """Propagate the current slice's box (or points) through the volume as the current object."""
        self._segment(volume=True)

    def _segment(self, volume: bool) -> None:
        def start() -> None:
            session = self._session()
            axis, index = self.position()
            prompts = self._prompts(axis, index)
            if prompts["box"] is None and prompts["points"] is None:
                raise ConfigError(f"no box or point on slice {index}: draw a rectangle or click on this slice.")
            job = session.segment_volume if volume else session.segment_slice
            encoded = session.encoded

            def finished(result: Any) -> None:
                self.labels_layer.refresh()
                ran = session.encoded - encoded
                if volume:
                    self._done(f"label {session.label}: slices {result.first}-{result.last} ({ran} encoded)")
                else:
                    self._done(f"label {session.label} on slice {index}: IoU~{result.iou:.2f} ({ran} encoded)")

            self._run(lambda: job(index, **prompts), finished, "segmenting…")

        self._guard(start)

    def next_object(self) -> None:
        """Commit the current object: clear the prompts and move to the next free label value."""
        if self.session is not None:
            self.label_spin.setValue(self.session.next_object())
        else:
            top = int(np.max(self.labels_layer.data)) if self.image_layer is not None else 0
            self.label_spin.setValue(max(self.label_spin.value(), top) + 1)
        if self.image_layer is not None:
            self.points_layer.data = np.empty((0, 3))
            self.boxes_layer.data = []

    def clear_object(self) -> None:
        """Erase the current label value from the label map."""
        if self.session is not None:
            self.session.clear_object()
            self.labels_layer.refresh()

    def save(self, path: str | None = None) -> list[str]:
        """Write the labels layer as NIfTI on the image's grid (asks for a file name when ``path`` is None)."""
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save labels", "", "NIfTI (*.nii.gz *.nii)")
            if not path:
                return []
        data, meta, _ = self.labels_layer.as_layer_data_tuple()
        written = self._guard(lambda: write_labels(path, data, meta)) or []
        if written:
            self._done(f"saved {written[0]}")
        return written

    # --- background jobs ----------------------------------------------------------------------------------------

    def _on_prompts_changed(self, event: Any = None) -> None:
        if not self.live_check.isChecked() or self.loaded is None:
            return
        if getattr(event, "action", "added") not in _FINAL_ACTIONS:
            return
        if self.busy:
            self._pending = True
        else:
            self.segment_slice()

    def _guard(self, job: Callable[[], Any]) -> Any:
        try:
            return job()
        except MedsegError as err:
            self._fail(err)
        return None

    def _run(self, job: Callable[[], Any], on_done: Callable[[Any], None], message: str) -> None:
        if self.busy:
            self.status.setText("busy: wait for the running job to finish")
            return
        self.busy, self.last_error = True, ""
        self.status.setText(message)
        self.progress.setRange(0, 0)  # busy indicator until a job reports progress
        for button in self.buttons:
            button.setEnabled(False)
        connect = {"returned": on_done, "errored": self._fail, "finished": self._finished}
        if inspect.isgeneratorfunction(job):
            connect["yielded"] = self._on_progress
        worker = create_worker(job, _connect=connect, _start_thread=False)  # errors: to the status line
        self._worker = worker
        worker.start()

    def _on_progress(self, value: tuple[int, int]) -> None:
        done, total = value
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done if total else 1)
        self.status.setText(f"embeddings: {done}/{total} slices")

    def _done(self, message: str) -> None:
        self.status.setText(message)

    def _fail(self, err: BaseException) -> None:
        self.last_error = str(err) if isinstance(err, MedsegError) else f"{type(err).__name__}: {err}"
        self.status.setText(self.last_error)

    def _finished(self) -> None:
        self.busy, self._worker = False, None
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        for button in self.buttons:
            button.setEnabled(True)
        if self._pending:
            self._pending = False
            self.segment_slice()
