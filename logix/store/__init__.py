"""HDF5 store: crash-safe sharded writer, a streaming reader, the score-matrix file, and the
names of a run directory (:mod:`logix.store.rundir`)."""

from logix.store import rundir
from logix.store.format import Block, IdType, Layout
from logix.store.reader import Chunk, Store, load_store
from logix.store.scores import ScoreMatrixWriter, read_score_matrix, write_virtual_score_matrix
from logix.store.writer import ShardWriter

__all__ = [
    "Block",
    "Chunk",
    "IdType",
    "Layout",
    "ScoreMatrixWriter",
    "ShardWriter",
    "Store",
    "load_store",
    "read_score_matrix",
    "rundir",
    "write_virtual_score_matrix",
]
