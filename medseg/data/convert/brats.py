"""BraTS 2021 glioma MRI (RSNA-ASNR-MICCAI BraTS 2021 training data).

Expected layout: ``BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz`` case folders in ``SOURCE``.
Channels are written in the order **t1 (0000), t1ce (0001), t2 (0002), flair (0003)**. Labels are remapped so that
they are consecutive: 0 background, 1 necrotic tumour core (NCR, unchanged), 2 peritumoral edema (ED, unchanged),
**3 enhancing tumour (ET, was 4)**. BraTS scores the regions whole tumour (1+2+3), tumour core (1+3) and enhancing
tumour (3), which can be computed from these labels.
"""

from __future__ import annotations

from pathlib import Path

from medseg.data.convert.common import CaseSource, ConversionPlan
from medseg.errors import DatasetError

__all__ = ["CHANNELS", "LABELS", "LABEL_MAP", "plan"]

CHANNELS = ("t1", "t1ce", "t2", "flair")
LABELS = {"background": 0, "necrotic_tumor_core": 1, "peritumoral_edema": 2, "enhancing_tumor": 3}
LABEL_MAP = {0: 0, 1: 1, 2: 2, 4: 3}


def plan(source: Path) -> ConversionPlan:
    """Read and check a folder of ``BraTS2021_XXXXX`` case folders."""
    if not source.is_dir():
        raise DatasetError(f"{source} is not a folder: expected a folder of BraTS2021_XXXXX case folders.")
    folders = sorted(p for p in source.iterdir() if p.is_dir() and p.name.startswith("BraTS"))
    if not folders:
        raise DatasetError(
            f"No BraTS2021_XXXXX case folders in {source}: expected e.g. "
            f"{source}/BraTS2021_00000/BraTS2021_00000_t1.nii.gz (the extracted training archive)."
        )
    cases = []
    for folder in folders:
        files = [folder / f"{folder.name}_{suffix}.nii.gz" for suffix in (*CHANNELS, "seg")]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DatasetError(
                f"{folder} lacks {', '.join(missing)}: expected {folder.name}_{{t1,t1ce,t2,flair,seg}}"
                ".nii.gz (validation/test releases have no seg: convert the training release)."
            )
        cases.append(CaseSource(folder.name, tuple(files[:4]), files[4]))
    extra = {
        "description": "BraTS 2021 glioma MRI; channels t1, t1ce, t2, flair; labels 1 NCR, 2 ED, 3 ET (4 in the "
        "source remapped to 3); see datasets/brats.md",
        "reference": "https://www.synapse.org/brats2021",
        "licence": "BraTS 2021 data terms (Synapse registration); see datasets/brats.md",
    }
    return ConversionPlan(
        "BraTS2021", dict(enumerate(c.upper() for c in CHANNELS)), dict(LABELS), cases, LABEL_MAP, extra
    )
