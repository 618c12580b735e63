"""Add the Hub and PEFT files to a release exported before they existed, from the release's own files.

``medseg export`` writes ``README.md``, Hub-valid front matter and, for adapter-only LoRA/DoRA releases, PEFT's
``adapter_config.json`` + ``adapter_model.safetensors``. A release exported earlier (the committed
``releases/medseg-litemedsam-mni-tissue``, whose training run is not kept) gets the same files without re-training:
the weights, config and example stay byte for byte, the card keeps its text (numbers, twin comparison) under the
front matter :func:`medseg.release.card.front_matter` derives from ``metadata.json``, and the checksums are
rewritten. The release is then verified as a user would (:func:`medseg.release.verify.verify_release`)::

    python -m medseg.release.upgrade releases/medseg-litemedsam-mni-tissue
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from medseg.atomic import atomic_write_json, atomic_write_text
from medseg.errors import ConfigError, MedsegError
from medseg.release.card import front_matter, loading_lines, read_front_matter
from medseg.release.checksums import verify_checksums, write_checksums
from medseg.release.hub import HUB_CARD, hub_base_model
from medseg.release.load import load_release, read_release_tensors
from medseg.release.metadata import read_metadata
from medseg.release.peft_adapter import peft_blocker, write_peft_adapter
from medseg.release.registry import release_digest
from medseg.release.spec import METADATA, MODEL_CARD
from medseg.release.verify import verify_release

__all__ = ["add_hub_files", "main"]


def add_hub_files(folder: str | Path, base_weights: str | Path | None = None) -> list[str]:
    """Write ``README.md``, the card's new front matter and (adapter-only LoRA/DoRA) the PEFT files; returns the
    files written.

    Raises:
        ChecksumError: the release is not intact before the upgrade.
        ConfigError: the card has no front matter; the upgraded release fails ``medseg verify`` (the check's reason).
    """
    folder = Path(folder)
    verify_checksums(folder)
    metadata = read_metadata(folder / METADATA)
    loaded = load_release(folder, base_weights=base_weights)
    written = []
    if metadata["weights"]["mode"] == "adapter-only":
        tensors = read_release_tensors(folder)
        reason = peft_blocker(loaded.model, tensors)
        hub_id = hub_base_model(metadata["training"].get("backbone"))
        files = write_peft_adapter(folder, loaded.model, tensors, hub_id) if reason is None else []
        metadata["peft"] = {"files": files, "base_model": hub_id} if reason is None else {"omitted": reason}
        atomic_write_json(folder / METADATA, metadata)
        written += [*files, METADATA]
    text = (folder / MODEL_CARD).read_text(encoding="utf-8")
    read_front_matter(text)  # refuses a card without front matter
    body = text.split("\n---\n", 1)[1]
    extra = loading_lines(metadata)
    if extra and extra[0] not in body:
        body = body.replace("\n## Input\n", "\n" + "\n".join(extra) + "\n## Input\n", 1)
    card = "---\n" + yaml.safe_dump(front_matter(metadata), sort_keys=False).rstrip() + "\n---\n" + body
    atomic_write_text(folder / MODEL_CARD, card)
    atomic_write_text(folder / HUB_CARD, card)
    write_checksums(folder)
    report = verify_release(folder, base_weights=base_weights)
    if not report.passed:
        raise ConfigError(f"{folder} fails verification after the upgrade: {report.checks[-1].detail}")
    return [*written, MODEL_CARD, HUB_CARD]


def main(argv: list[str] | None = None) -> int:
    """``python -m medseg.release.upgrade RELEASE_DIR``: upgrade, print the files and the new ``sums_sha256``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m medseg.release.upgrade RELEASE_DIR", file=sys.stderr)
        return 2
    try:
        files = add_hub_files(args[0])
    except MedsegError as err:
        print(f"medseg upgrade: {err}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(files)}; sums_sha256 (registry.yaml): {release_digest(args[0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
