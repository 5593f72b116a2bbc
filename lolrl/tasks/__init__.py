"""Task families: the paper's small-model tasks (``paper``) and Helpful-and-Harmless (``hh``)."""
