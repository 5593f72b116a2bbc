#!/usr/bin/env python
"""Drop HH training records whose responses end with ':' (cut off), as the original data_cleaning.py.

    python data_cleaning.py [--input data/hh_train_len2/train.json] [--output data/hh_train_len2/cleaner_train.json]
"""
import json
import sys
from dataclasses import dataclass

from lolrl.engine.data import DataError
from lolrl.tasks.hh.data import clean_training_rows, read_pro_file
from lolrl.utils.cli import DataclassParser, setting
from lolrl.utils.io import atomic_write_text


@dataclass
class CleaningArguments:
    """The cleaning's input and output (the original had no flags: these are its fixed paths)."""

    input: str = setting("data/hh_train_len2/train.json", "PRO-format training records")
    output: str = setting("data/hh_train_len2/cleaner_train.json", "the records kept")


def main(argv=None) -> int:
    args = DataclassParser(CleaningArguments, description=__doc__).parse_one(argv)
    try:
        rows = read_pro_file(args.input)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kept, report = clean_training_rows(rows)
    atomic_write_text(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    print(f"{report['records']} records: {report['good_suffix_ends_with_colon']} good and "
          f"{report['bad_suffix_ends_with_colon']} bad suffixes end with ':'; dropped {report['dropped']}, "
          f"kept {report['kept']} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
