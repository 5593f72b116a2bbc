"""Small utilities below the engine: atomic I/O, keyed caches, checkpoints, user errors."""
