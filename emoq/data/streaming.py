"""A `datasets` split read as a stream (`data.streaming: true`): for corpora larger than memory or disk.

Each rank reads its own part of the stream (``split_dataset_by_node``: whole shards when their number divides
among the ranks, else every world-th row), so over one pass every row reaches exactly one rank. Rows are
decoded as they arrive and gathered in a buffer of ``buffer_size`` clips; a full buffer is shuffled, cut into
batches of clips of similar length (less padding, as the map-style length-grouped sampler does within its
own groups) and those batches are yielded in a shuffled order. The stream repeats pass after pass; a run
counts its length in optimiser steps (`trainer.max_steps`).

Resume is exact: :meth:`StreamingUtterances.state_dict` records the pass, the stream's own position at the
start of the current buffer (``IterableDataset.state_dict``) and how many clips of that buffer were yielded;
loading it refills the same buffer, shuffles it the same way (the order depends only on the seed, the pass and
the buffer's number) and skips what was already yielded. The position is the main process's, so the stream is
read there (DataLoader workers would each hold a position of their own).

A row whose audio cannot be decoded is logged with its key (once) and kept in ``skipped``, never dropped silently.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import numpy as np
import torch

from ..audio import AudioError, load_audio
from .collate import utterance_item
from .hf import RowConverter, open_split, utterance_stream

__all__ = ["StreamingUtterances"]

log = logging.getLogger("emoq.data.streaming")


class StreamingUtterances(torch.utils.data.IterableDataset):
    """Items like :class:`~emoq.data.collate.UtteranceDataset`'s, from a streamed split, for one rank."""

    def __init__(self, path: str, split: str, *, columns, label_set, label_map, label2id: dict[str, int],
                 batch_size: int, buffer_size: int = 256, seed: int = 0, rank: int = 0, world_size: int = 1,
                 max_seconds: float | None = None, use_transcript: bool = True, name: str | None = None,
                 revision: str | None = None):
        from datasets.distributed import split_dataset_by_node

        stream, base = open_split(path, split, name=name, revision=revision, streaming=True,
                                  audio_column=columns.audio)
        self.convert = RowConverter(stream.features, columns, label_set, label_map, str(path), split, base)
        if stream.column_names is not None:
            self.convert.check_columns(stream.column_names)
        self.stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
        self.audio_column = columns.audio
        self.label2id, self.batch_size, self.buffer_size = label2id, batch_size, max(buffer_size, batch_size)
        self.seed, self.max_seconds, self.use_transcript = seed, max_seconds, use_transcript
        self._start = copy.deepcopy(self.stream.state_dict())
        self._position = {"pass": 0, "buffer": 0, "stream": copy.deepcopy(self._start), "yielded": 0}
        self.skipped: dict[str, str] = {}  # key -> why its audio cannot be used

    # ------------------------------------------------------------------ position

    def state_dict(self) -> dict:
        """Where the stream stands (JSON-ready): saved with each checkpoint."""
        return copy.deepcopy(self._position)

    def load_state_dict(self, state: dict) -> None:
        self._position = copy.deepcopy(state)

    # ------------------------------------------------------------------ items

    def __iter__(self) -> Iterator[dict]:
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("a streamed split is read in the main process (data.num_workers: 0): its position is "
                               "saved with each checkpoint for an exact resume")
        position = self._position
        while True:
            resumed_mid_pass = position["buffer"] > 0 or position["yielded"] > 0
            delivered = 0
            self.stream.load_state_dict(copy.deepcopy(position["stream"]))
            rows = iter(utterance_stream(self.stream, self.convert, self.audio_column))
            started = False
            while True:
                if started:  # the stream's own position is only defined once it is being read
                    position["stream"] = copy.deepcopy(self.stream.state_dict())
                started = True
                buffer = self._fill(rows)
                if not buffer:
                    break
                order = self._order(buffer, position["pass"], position["buffer"])
                for index in order[position["yielded"]:]:
                    position["yielded"] += 1
                    delivered += 1
                    yield buffer[index]
                position["buffer"] += 1
                position["yielded"] = 0
            if not delivered and not resumed_mid_pass:  # never spin on a stream with nothing usable
                raise RuntimeError(f"{self.convert.source} [{self.convert.split}]: a pass over the stream gave no "
                                   f"usable row ({len(self.skipped)} skipped)")
            position.update({"pass": position["pass"] + 1, "buffer": 0, "stream": copy.deepcopy(self._start),
                             "yielded": 0})

    def _fill(self, rows: Iterator) -> list[dict]:
        buffer = []
        for u in rows:
            try:
                audio = load_audio(u.audio, max_seconds=self.max_seconds)
            except AudioError as err:
                if u.key not in self.skipped:  # once, not once per pass
                    self.skipped[u.key] = str(err)
                    log.warning("%s: skipped, its audio cannot be used: %s", u.key, err)
                continue
            buffer.append({**utterance_item(u, self.label2id, self.use_transcript), "audio": audio})
            if len(buffer) == self.buffer_size:
                break
        return buffer

    def _order(self, buffer: list[dict], pass_no: int, buffer_no: int) -> list[int]:
        """Indices of `buffer` in yield order: shuffled, grouped by length into batches, batches shuffled. A
        function of the seed, the pass, the buffer's number and its clips only (what resume relies on)."""
        rng = np.random.default_rng([self.seed, pass_no, buffer_no])
        shuffled = rng.permutation(len(buffer))
        by_length = sorted(shuffled, key=lambda i: len(buffer[i]["audio"]))
        batches = [by_length[i:i + self.batch_size] for i in range(0, len(by_length), self.batch_size)]
        return [int(i) for b in rng.permutation(len(batches)) for i in batches[b]]
