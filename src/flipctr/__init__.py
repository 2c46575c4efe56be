"""flipctr: CTR prediction with ID-based models aligned to pretrained language models (FLIP)."""

from ._version import __version__ as __version__


def load(run_dir):
    """The trained model of a run folder, ready for ``.predict(frame)`` (see ``flipctr.runs.inference``)."""
    from .runs.inference import load as _load

    return _load(run_dir)
