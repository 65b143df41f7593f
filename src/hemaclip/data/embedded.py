"""The few PBC test cells shipped inside the package, so `hemaclip demo` shows something without any data.

`scripts/make_demo_sample.py` chose them (seeded, from the `pbc` test split, which no shipped choice used)
and wrote them to `assets/demo_cells/<class>/<file>.jpg` with `manifest.csv` (file, true class, source
file, attributes where WBCAtt annotates the cell) and the attribution the CC BY 4.0 licence asks for.
They are found as package resources, never relative to a source checkout.
"""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

from hemaclip.data.attributes import ATTRIBUTE_NAMES
from hemaclip.data.datasets import PBC_LAB, CellRecord
from hemaclip.errors import DataError

SAMPLE_FOLDER = "demo_cells"
MANIFEST_NAME = "manifest.csv"
ATTRIBUTION_NAME = "ATTRIBUTION.md"
# The manifest's columns: the packaged file (relative to the sample folder), its true class and PBC
# sub-class prefix, the source file under the data root, then the 11 WBCAtt attributes (empty if none).
MANIFEST_COLUMNS: tuple[str, ...] = ("file", "label", "fine_label", "source", *ATTRIBUTE_NAMES)
SAMPLE_SPLIT = "test"
ATTRIBUTION = (
    "Cell images: PBC dataset, Acevedo A., Merino A., Alférez S., Molina Á., Boldú L., Rodellar J. "
    '"A dataset of microscopic peripheral blood cell images for development of automatic recognition systems", '
    "Data in Brief 30, 105474 (2020), doi:10.1016/j.dib.2020.105474, Mendeley Data snkd93bnjr/1; "
    "licence CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/); re-encoded as smaller JPEGs."
)


def embedded_sample_dir() -> Path:
    """The packaged sample folder (inside the installed package, wherever it is installed)."""
    return Path(str(resources.files("hemaclip") / "assets" / SAMPLE_FOLDER))


def load_embedded_sample(folder: Path | None = None) -> list[CellRecord]:
    """The embedded cells as records (split 'test', PBC's lab), in manifest order; DataError if the
    manifest or one of its images is missing, so a broken install says what is wrong."""
    folder = embedded_sample_dir() if folder is None else folder
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        raise DataError(f"{manifest}: the embedded demo sample is missing; reinstall hemaclip or pass --data DIR")
    with manifest.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{manifest}: missing columns {', '.join(missing)}")
        rows = list(reader)
    records = []
    for row in rows:
        path = folder / row["file"]
        if not path.is_file():
            raise DataError(f"{path}: listed in {manifest} but missing; reinstall hemaclip or pass --data DIR")
        attributes = {name: row[name] for name in ATTRIBUTE_NAMES}
        records.append(
            CellRecord(
                path=path,
                label=row["label"],
                split=SAMPLE_SPLIT,
                attributes=attributes if all(attributes.values()) else None,
                fine_label=row["fine_label"] or None,
                lab=PBC_LAB,
            )
        )
    if not records:
        raise DataError(f"{manifest}: lists no cells")
    return records
