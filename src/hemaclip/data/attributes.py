"""The WBCAtt attribute vocabulary and the class vocabularies of the bundled datasets.

One place defines every label space, so captions, prompts, heads and metrics agree on the
order of attributes and values (the order is part of the checkpoint format).
"""

from __future__ import annotations

# The 11 WBCAtt morphological attributes (Tsutsui et al., NeurIPS 2023), in CSV column order,
# each with its allowed values as spelled in the published CSVs.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "cell_size": ("big", "small"),
    "cell_shape": ("round", "irregular"),
    "nucleus_shape": (
        "unsegmented-band",
        "unsegmented-round",
        "unsegmented-indented",
        "segmented-bilobed",
        "segmented-multilobed",
        "irregular",
    ),
    "nuclear_cytoplasmic_ratio": ("low", "high"),
    "chromatin_density": ("densely", "loosely"),
    "cytoplasm_vacuole": ("no", "yes"),
    "cytoplasm_texture": ("clear", "frosted"),
    "cytoplasm_colour": ("light blue", "blue", "purple blue"),
    "granule_type": ("small", "round", "coarse", "nil"),
    "granule_colour": ("pink", "purple", "red", "nil"),
    "granularity": ("yes", "no"),
}

ATTRIBUTE_NAMES: tuple[str, ...] = tuple(ATTRIBUTES)

# Class vocabularies. Names are the folder names used on disk (lower case).
WBCATT_CLASSES: tuple[str, ...] = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
PBC_CLASSES: tuple[str, ...] = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)
# The 11-class PBC task from file-name prefixes (unlabelled IG / NEUTROPHIL prefixes excluded).
PBC11_PREFIXES: dict[str, str] = {
    "BA": "basophil",
    "EO": "eosinophil",
    "ERB": "erythroblast",
    "LY": "lymphocyte",
    "MO": "monocyte",
    "PLATELET": "platelet",
    "SNE": "segmented_neutrophil",
    "BNE": "band_neutrophil",
    "MY": "myelocyte",
    "MMY": "metamyelocyte",
    "PMY": "promyelocyte",
}
PBC11_CLASSES: tuple[str, ...] = tuple(sorted(PBC11_PREFIXES.values()))
ALL_CLASSES: tuple[str, ...] = ("benign", "early", "pre", "pro")
ALL_FOLDERS: dict[str, str] = {"Benign": "benign", "Early": "early", "Pre": "pre", "Pro": "pro"}


def validate_attributes(values: dict[str, str], source: str) -> dict[str, str]:
    """Return the 11 attribute values of a row, raising a one-line error naming `source` if any is unknown."""
    from hemaclip.errors import DataError

    clean: dict[str, str] = {}
    for name, allowed in ATTRIBUTES.items():
        if name not in values:
            raise DataError(f"{source}: missing attribute column '{name}'")
        value = str(values[name]).strip()
        if value not in allowed:
            raise DataError(f"{source}: unknown value {value!r} for attribute '{name}' (allowed: {', '.join(allowed)})")
        clean[name] = value
    return clean
