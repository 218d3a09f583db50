import pytest

from wbc_edge import taxonomy as tx


def test_thirteen_wbcbench_codes_have_names_and_five_part_entries():
    assert len(tx.WBC_CODES) == 13 and len(set(tx.WBC_CODES)) == 13
    for code in tx.ALL_CODES:
        assert tx.FULL_NAMES[code]
    assert set(tx.FIVE_PART) == set(tx.WBC_CODES)
    assert set(tx.FIVE_PART.values()) == {"NE", "LY", "MO", "EO", "BA", "OTHER"}
    assert not any(tx.is_wbc(c) for c in tx.NON_WBC_CODES)


def test_normalise_and_map():
    assert tx.normalise_code(" sne ") == "SNE"
    assert tx.normalise_code("Plasma cell") == "PC"
    with pytest.raises(tx.UnknownClassError, match="XYZ"):
        tx.normalise_code("XYZ")
    assert tx.map_labels(["BNE", "LY", "PLY"], "5part") == ["NE", "LY", "LY"]
    with pytest.raises(tx.UnknownClassError):
        tx.map_labels(["ERB"], "5part")
