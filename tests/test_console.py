"""What commands print: whole tables when piped, other libraries' noise hidden, medseg's own warnings kept."""

from __future__ import annotations

import logging
import warnings

from medseg.console import PIPE_WIDTH, quiet_third_party, wide_console
from medseg.workflows.quickstart import format_table


def summary(dice: float) -> dict:
    metrics = {"dice": dice, "hd95": 4.25, "nsd": 0.75}
    return {
        "dataset": "Dataset991_MNITissue", "n_cases": 3, "mean": {"grey_matter": metrics, "white_matter": metrics},
        "foreground_mean": metrics, "trainable_params": 1234567, "trainable_percent": 12.5, "steps_trained": 30,
        "train_wall_time_s": 200.0, "eval_wall_time_s": 20.0,
    }  # fmt: skip


def test_tables_are_whole_when_stdout_is_not_a_terminal(capsys, monkeypatch):
    """The quickstart table read "pret..." in a log: rich gives a pipe 80 columns."""
    monkeypatch.delenv("COLUMNS", raising=False)
    console = wide_console()
    assert console.width == PIPE_WIDTH
    console.print(format_table({"pretrained": summary(0.81), "scratch": summary(0.42)}))
    out = capsys.readouterr().out
    assert "pretrained" in out and "…" not in out and "1,234,567 (12.5 %)" in out and "white_matter" in out
    monkeypatch.setenv("COLUMNS", "100")
    assert wide_console().width == 100  # the user's own setting wins


def test_third_party_noise_is_hidden_and_medseg_warnings_are_not(tmp_path, caplog):
    import nibabel as nib
    import numpy as np

    from medseg.data.io import load_image

    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.float32), np.eye(4)), path)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        quiet_third_party()
        load_image(path)  # MONAI builds its readers: nvImageCodec's warning and log line
        warnings.warn_explicit("old API", FutureWarning, "monai/utils/deprecate_utils.py", 1, module="monai.utils")
        warnings.warn_explicit("a medseg warning", FutureWarning, "medseg/data/io.py", 1, module="medseg.data.io")
        warnings.warn_explicit("a user warning", UserWarning, "lightning/trainer.py", 1, module="lightning.trainer")
        logging.getLogger("alembic.runtime.plugins").info("setup plugin alembic.autogenerate.schemas")
    assert sorted(str(w.message) for w in caught) == ["a medseg warning", "a user warning"]
    assert not [r for r in caplog.records if "nvImageCodec" in r.getMessage() or r.name.startswith("alembic")]

    quiet_third_party(debug=True)  # --debug: the loggers follow the root's level again
    assert logging.getLogger("alembic").level == logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").level == 0
