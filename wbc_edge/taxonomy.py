"""Class codes: the 13 WBCBench white-cell classes, the non-WBC objects a localiser meets, label maps."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
# The parts of a 5-part differential. LY, MO, EO and BA are fine codes as well; NE is not: a lab that
# reports 5 parts labels a neutrophil NE without saying segmented or band. OTHER is a map's target
# for a class no part fits. Both are label codes (a dataset folder may be called NE) but never classes
# a model is trained on, hence kept out of ALL_CODES.
FIVE_PARTS: tuple[str, ...] = ("NE", "LY", "MO", "EO", "BA")
OTHER = "OTHER"
COARSE_CODES: tuple[str, ...] = ("NE", OTHER)
# A coarse label maps to itself, so one map scores fine-labelled and 5-part-labelled data alike.
LABEL_MAPS: dict[str, dict[str, str]] = {"5part": {**FIVE_PART, **{p: p for p in FIVE_PARTS}}}
# Strict about maturity, as ../shared/tools/site-check scores: a 5-part lab's NE is a mature neutrophil,
# so an immature granulocyte call for it is an error (OTHER), not a neutrophil.
LABEL_MAPS["5part-strict"] = {**LABEL_MAPS["5part"], **{c: OTHER for c in ("MMY", "MY", "PMY")}}

# Common spellings seen in public datasets, mapped to our codes. A plain "neutrophil" is the coarse NE
# (a lab that splits segmented from band says so); plurals are handled in normalise_code.
ALIASES: dict[str, str] = {
    "NEUTROPHIL": "NE", "NEU": "NE", "NEUT": "NE", "SEGMENTED_NEUTROPHIL": "SNE",
    "BAND": "BNE", "BAND_NEUTROPHIL": "BNE", "LYMPHOCYTE": "LY", "LYM": "LY", "LYMPH": "LY",
    "MONOCYTE": "MO", "MON": "MO", "MONO": "MO", "EOSINOPHIL": "EO", "EOS": "EO", "BASOPHIL": "BA",
    "BAS": "BA", "BASO": "BA", "METAMYELOCYTE": "MMY", "MYELOCYTE": "MY", "PROMYELOCYTE": "PMY",
    "BLAST": "BL", "PLASMA_CELL": "PC", "PROLYMPHOCYTE": "PLY", "ERYTHROBLAST": "ERB", "PLT": "PLATELET",
}


class UnknownClassError(ValueError):
    pass


def normalise_code(label: str) -> str:
    """Canonical code for `label` (case-insensitive; known aliases and their plurals accepted)."""
    key = str(label).strip().upper().replace(" ", "_").replace("-", "_")
    for k in (key, key[:-1] if key.endswith("S") else key):  # "eosinophils", "PLATELETS"
        if k in ALL_CODES or k in COARSE_CODES:
            return k
        if k in ALIASES:
            return ALIASES[k]
    known = ", ".join(ALL_CODES + COARSE_CODES)
    raise UnknownClassError(f"unknown class label {label!r}; known codes: {known}")


def is_wbc(code: str) -> bool:
    return code in WBC_CODES


def map_labels(codes, mapping: str | dict[str, str]) -> list[str]:
    """Map codes through a named (e.g. '5part') or explicit label map; unmapped codes are an error."""
    table = LABEL_MAPS[mapping] if isinstance(mapping, str) else mapping
    missing = sorted({c for c in codes if c not in table})
    if missing:
        raise UnknownClassError(f"label map has no entry for {missing}")
    return [table[c] for c in codes]


class LabelMapError(ValueError):
    pass


@dataclass(frozen=True)
class LabelMap:
    """`table`: code -> part. The parts (in table order, OTHER left out) are the classes it scores."""
    name: str
    table: dict[str, str]

    @property
    def parts(self) -> list[str]:
        return [p for p in dict.fromkeys(self.table.values()) if p != OTHER]

    def label_part(self, code) -> str | None:
        """The part a dataset label counts as (a part maps to itself); None if it is scored under none."""
        part = self.table.get(code, code if code in self.parts else None)
        return part if part in self.parts else None

    def pred_part(self, code) -> str:
        """The part a model's prediction counts as; OTHER (a miss whatever the truth) if none."""
        return self.label_part(code) or OTHER


def load_label_map(spec) -> LabelMap:
    """A label map by name (see LABEL_MAPS) or from a YAML file of `code: part` lines."""
    if isinstance(spec, LabelMap):
        return spec
    if str(spec) in LABEL_MAPS:
        return LabelMap(str(spec), LABEL_MAPS[str(spec)])
    path = Path(spec)
    if not path.is_file():
        raise LabelMapError(f"label map {str(spec)!r}: neither a known map ({', '.join(LABEL_MAPS)}) "
                            "nor a file")
    return LabelMap(path.stem, _read_map_file(path))


def _code_or_self(name) -> str:
    # a YAML map may name codes by any spelling normalise_code knows; other names (a custom part
    # such as "granulocyte") are kept as written
    try:
        return normalise_code(name)
    except UnknownClassError:
        return str(name).strip()


def _read_map_file(path: Path) -> dict[str, str]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise LabelMapError(f"{path}: cannot read a label map from it: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise LabelMapError(f"{path}: a label map is a non-empty YAML mapping `code: part`, "
                            f"found {type(data).__name__}")
    table: dict[str, str] = {}
    for key, part in data.items():
        if not isinstance(part, str) or not part.strip():
            raise LabelMapError(f"{path}: {key!r} maps to {part!r}; a part must be a name such as NE")
        code, part = _code_or_self(key), _code_or_self(part)
        if table.setdefault(code, part) != part:
            raise LabelMapError(f"{path}: {key!r} ({code}) maps to both {table[code]} and {part}")
    return table
