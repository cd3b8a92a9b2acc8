"""The on-disk layout and atomic writes: a leaf that imports nothing else of lminfluence."""
