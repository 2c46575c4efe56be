"""The paper's Table 2, in one place: every benchmark and `flipctr run` reads it here (its Table 1
counts are with each dataset, :mod:`flipctr.data.datasets`).

FLIP (RecSys 2024). Table 2 reports test AUC / Logloss, selected on the test split.
"""

from __future__ import annotations

DATASETS = ("ml-1m", "bookcrossing", "goodreads")

# Table 2: model -> (AUC, Logloss) per dataset, in the order of DATASETS.
_TABLE2: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    # ID-based
    "afm": ((0.8449, 0.3950), (0.7946, 0.5116), (0.7630, 0.5160)),
    "pnn": ((0.8546, 0.3946), (0.7956, 0.5131), (0.7725, 0.5055)),
    "widedeep": ((0.8509, 0.3957), (0.7951, 0.5116), (0.7684, 0.5090)),
    "dcn": ((0.8509, 0.4056), (0.7957, 0.5108), (0.7693, 0.5086)),
    "deepfm": ((0.8539, 0.3905), (0.7947, 0.5122), (0.7671, 0.5138)),
    "xdeepfm": ((0.8454, 0.3934), (0.7953, 0.5108), (0.7720, 0.5079)),
    "afn": ((0.8525, 0.3868), (0.7932, 0.5139), (0.7654, 0.5118)),
    "autoint": ((0.8509, 0.4013), (0.7953, 0.5118), (0.7716, 0.5071)),
    "dcnv2": ((0.8548, 0.3893), (0.7956, 0.5103), (0.7724, 0.5057)),
    "flip_id": ((0.8600, 0.3802), (0.8030, 0.5043), (0.7779, 0.5014)),
    # PLM-based
    "ctr_bert": ((0.8304, 0.4131), (0.7795, 0.5300), (0.7385, 0.5316)),
    "p5": ((0.8304, 0.4173), (0.7801, 0.5261), (0.7365, 0.5336)),
    "ptab": ((0.8426, 0.4195), (0.7880, 0.5384), (0.7456, 0.5268)),
    "flip_plm": ((0.8460, 0.4127), (0.7924, 0.5304), (0.7476, 0.5255)),
    # ID+PLM
    "ctrl": ((0.8572, 0.3838), (0.7985, 0.5101), (0.7741, 0.5045)),
    "morec": ((0.8561, 0.3896), (0.7990, 0.5087), (0.7731, 0.5085)),
    "flip": ((0.8621, 0.3788), (0.8061, 0.5004), (0.7787, 0.5001)),
}

def table2(dataset: str, model: str) -> tuple[float, float] | None:
    """The paper's ``(test AUC, test Logloss)`` of ``model`` on ``dataset``; None if it reports none.

    ``model`` is a flipctr model name (``dcnv2``, ``widedeep``, ...) or a FLIP variant
    (``scratch`` = the DCNv2 backbone from scratch, ``flip_id``, ``flip_plm``, ``flip``).
    """
    row = _TABLE2.get("dcnv2" if model == "scratch" else model)
    if row is None or dataset not in DATASETS:
        return None
    return row[DATASETS.index(dataset)]
