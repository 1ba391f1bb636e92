"""Data sources by spec string (sources.py) and what they give (bundle.py)."""

from compressor.data.bundle import IMAGENET_PREPROCESSING, UNLABELLED, DataBundle, Preprocessing, stratified_split
from compressor.data.sources import DATA_SOURCES, load_data, load_digits32

__all__ = ["DATA_SOURCES", "IMAGENET_PREPROCESSING", "UNLABELLED", "DataBundle", "Preprocessing", "load_data",
           "load_digits32", "stratified_split"]
