"""Which rows of each source a stage uses: held-out splits, fractions and row counts, all fixed by the seed.

Rows are chosen by a permutation seeded with (seed, source name), so the same command picks the same rows
on any machine, and two sources never share a random stream. Selected rows keep their original index in
`__row`, so every later message can name the row of the file a user opens.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

from alignment.errors import ConfigError
from alignment.config.schema import SourceConfig
from alignment.data.loading import holds_train_only, load_split, locate

ROW = "__row"


@dataclass
class Selection:
    source: SourceConfig
    role: str        # train | eval
    split: str       # the source's split, or "<train split> (held out)"
    available: int   # rows the split offered
    data: object     # datasets.Dataset of the chosen rows, with ROW


def _rng(seed: int, source: SourceConfig, purpose: str):
    import numpy as np

    return np.random.default_rng([seed, zlib.crc32(f"{source.name}/{purpose}".encode())])


def _take(raw, indices, source: SourceConfig, role: str, split: str, available: int) -> Selection:
    indices = sorted(int(i) for i in indices)  # reading order: better disk locality; the trainer shuffles anyway
    data = raw.select(indices).add_column(ROW, indices)
    return Selection(source, role, split, available, data)


def select(source: SourceConfig, seed: int, key: str) -> list[Selection]:
    """The train selection and, when the source has one, the eval selection."""
    train_split = source.train_split
    raw_train = load_split(source, train_split)
    order = _rng(seed, source, "split").permutation(len(raw_train))
    selections = []
    if source.test_size > 0:
        held_out = math.ceil(source.test_size * len(raw_train))  # rounding up, as datasets' train_test_split
        if held_out >= len(raw_train):
            raise ConfigError(f"{key}.test_size={source.test_size} holds out all {len(raw_train)} rows of "
                              f"{source.name}; lower it.")
        kept = order[:held_out][:source.eval_rows]  # the held-out rows are already in random order
        selections.append(_take(raw_train, kept, source, "eval", f"{train_split} (held out)", held_out))
        pool = order[held_out:]
    else:
        pool = order
    if source.rows is not None:
        if source.rows > len(pool):
            raise ConfigError(f"{key}.rows={source.rows} but {source.name} {train_split} has {len(pool)} rows "
                              f"to train on; lower it or use {key}.fraction.")
        count = source.rows
    else:
        count = max(1, round(source.fraction * len(pool)))
    selections.insert(0, _take(raw_train, pool[:count], source, "train", train_split, len(pool)))

    if source.eval_split and not holds_train_only(locate(source)):
        raw_eval = load_split(source, source.eval_split)
        chosen = range(len(raw_eval))
        if source.eval_rows is not None and source.eval_rows < len(raw_eval):
            chosen = _rng(seed, source, "eval").permutation(len(raw_eval))[:source.eval_rows]
        selections.append(_take(raw_eval, chosen, source, "eval", source.eval_split, len(raw_eval)))
    return selections
