"""HDF5 store: crash-safe sharded writer and a streaming reader."""

from logix.store.format import Block, Layout
from logix.store.reader import Chunk, Store, load_store
from logix.store.writer import ShardWriter

__all__ = ["Block", "Chunk", "Layout", "ShardWriter", "Store", "load_store"]
