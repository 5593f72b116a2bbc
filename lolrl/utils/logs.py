"""The scripts' logging, set up in one place: the library's logger (``lolrl.*``) to stderr and, for a training
run, to ``OUTPUT/train_output.log``; INFO on the main process, WARNING on the others."""
from __future__ import annotations

import logging
import os
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(output_dir: str | Path | None = None, level: int = logging.INFO) -> None:
    """Log ``lolrl.*`` at ``level`` (WARNING on every process but the main one) to stderr, and to
    ``output_dir/train_output.log`` on the main process when given; calling it again replaces both handlers."""
    library = logging.getLogger("lolrl")
    for handler in [h for h in library.handlers if getattr(h, "_lolrl", False)]:
        library.removeHandler(handler)
        handler.close()
    is_main = int(os.environ.get("RANK", "0")) == 0
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if is_main and output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "train_output.log"))
    formatter = logging.Formatter(FORMAT)
    for handler in handlers:
        handler._lolrl = True
        handler.setFormatter(formatter)
        library.addHandler(handler)
    library.setLevel(level if is_main else max(level, logging.WARNING))
