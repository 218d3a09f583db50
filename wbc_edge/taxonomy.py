"""Class codes: the 13 WBCBench white-cell classes, the non-WBC objects a localiser meets, label maps."""
from __future__ import annotations

# The WBCBench 2026 codes (CellaVision naming), in the challenge's order.
WBC_CODES: tuple[str, ...] = (
    "SNE", "BNE", "LY", "VLY", "MO", "EO", "BA", "MMY", "MY", "PMY", "BL", "PC", "PLY",
)
NON_WBC_CODES: tuple[str, ...] = ("ERB", "PLATELET")
ALL_CODES: tuple[str, ...] = WBC_CODES + NON_WBC_CODES

FULL_NAMES: dict[str, str] = {
    "SNE": "segmented neutrophil",
    "BNE": "band neutrophil",
    "LY": "lymphocyte",
    "VLY": "variant (reactive) lymphocyte",
    "MO": "monocyte",
    "EO": "eosinophil",
    "BA": "basophil",
    "MMY": "metamyelocyte",
    "MY": "myelocyte",
    "PMY": "promyelocyte",
    "BL": "blast",
    "PC": "plasma cell",
    "PLY": "prolymphocyte",
    "ERB": "erythroblast (nucleated red cell, not a WBC)",
    "PLATELET": "platelet / platelet clump (not a WBC)",
}

# Cells a hematologist must see: immature granulocytes, blasts, plasma cells, atypical lymphocytes.
RARE_CODES: frozenset[str] = frozenset({"BL", "PMY", "MY", "MMY", "PC", "PLY", "VLY"})

# The classic 5-part differential; immature granulocytes count with neutrophils, lymphoid variants
# with lymphocytes, as a 5-part haematology analyser would report them. Blasts fit no part: an
# analyser flags them, so they map to OTHER rather than being hidden inside a normal class.
FIVE_PART: dict[str, str] = {
    "SNE": "NE", "BNE": "NE", "MMY": "NE", "MY": "NE", "PMY": "NE",
    "LY": "LY", "VLY": "LY", "PLY": "LY", "PC": "LY",
    "MO": "MO", "EO": "EO", "BA": "BA", "BL": "OTHER",
}
LABEL_MAPS: dict[str, dict[str, str]] = {"5part": FIVE_PART}

# Common spellings seen in public datasets, mapped to our codes.
ALIASES: dict[str, str] = {
    "NEUTROPHIL": "SNE", "SEGMENTED_NEUTROPHIL": "SNE", "BAND": "BNE", "LYMPHOCYTE": "LY",
    "MONOCYTE": "MO", "EOSINOPHIL": "EO", "BASOPHIL": "BA", "METAMYELOCYTE": "MMY",
    "MYELOCYTE": "MY", "PROMYELOCYTE": "PMY", "BLAST": "BL", "PLASMA_CELL": "PC",
    "PROLYMPHOCYTE": "PLY", "ERYTHROBLAST": "ERB", "PLT": "PLATELET",
}


class UnknownClassError(ValueError):
    pass


def normalise_code(label: str) -> str:
    """Canonical class code for `label` (case-insensitive; known aliases accepted)."""
    key = label.strip().upper().replace(" ", "_").replace("-", "_")
    if key in ALL_CODES:
        return key
    if key in ALIASES:
        return ALIASES[key]
    raise UnknownClassError(f"unknown class label {label!r}; known codes: {', '.join(ALL_CODES)}")


def is_wbc(code: str) -> bool:
    return code in WBC_CODES


def map_labels(codes, mapping: str | dict[str, str]) -> list[str]:
    """Map codes through a named (e.g. '5part') or explicit label map; unmapped codes are an error."""
    table = LABEL_MAPS[mapping] if isinstance(mapping, str) else mapping
    missing = sorted({c for c in codes if c not in table})
    if missing:
        raise UnknownClassError(f"label map has no entry for {missing}")
    return [table[c] for c in codes]
