"""``lolrl clean-hh`` (the original ``data_cleaning.py``): drop HH training records whose responses end with ':'
(cut off).

    lolrl clean-hh [--input data/hh_train_len2/train.json] [--output data/hh_train_len2/cleaner_train.json]
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from lolrl.engine.data import DataError
from lolrl.tasks.hh.data import clean_training_rows, read_pro_file
from lolrl.utils.cli import DataclassParser, setting
from lolrl.utils.errors import report_user_error
from lolrl.utils.io import atomic_write_text


@dataclass
class CleaningArguments:
    """The cleaning's input and output (the original had no flags: these are its fixed paths)."""

    input: str = setting("data/hh_train_len2/train.json", "PRO-format training records")
    output: str = setting("data/hh_train_len2/cleaner_train.json", "the records kept")


def main(argv: list[str] | None = None) -> int:
    args = DataclassParser(CleaningArguments, description=__doc__).parse_one(argv)
    try:
        rows = read_pro_file(args.input)
    except DataError as exc:
        return report_user_error(exc)
    kept, report = clean_training_rows(rows)
    atomic_write_text(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    print(f"{report['records']} records: {report['good_suffix_ends_with_colon']} good and "
          f"{report['bad_suffix_ends_with_colon']} bad suffixes end with ':'; dropped {report['dropped']}, "
          f"kept {report['kept']} -> {args.output}")
    return 0
