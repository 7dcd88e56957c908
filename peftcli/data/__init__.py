"""The data stage: sources -> rows -> examples -> tokens with loss masks (see pipeline.py)."""

from peftcli.data.encode import IGNORE, Encoded
from peftcli.data.pipeline import PreparedData, SplitStats, prepare_data

__all__ = ["IGNORE", "Encoded", "PreparedData", "SplitStats", "prepare_data"]
