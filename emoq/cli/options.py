"""Command-line options several commands share: checked numbers, and where a `datasets` corpus is and how its
columns read (`--dataset hf` of eval, predict and prepare)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a batch size of 0 would silently classify nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_hf_arguments(p: argparse.ArgumentParser) -> None:
    """--path / --name / --revision and the column and label mapping of `--dataset hf`."""
    g = p.add_argument_group("--dataset hf (a `datasets` dataset)")
    g.add_argument("--path", help="Hub id, save_to_disk folder, audiofolder-style folder (SPLIT/metadata.csv) or "
                   "data files ({split} stands for the split name)")
    g.add_argument("--name", default=None, help="the Hub dataset's configuration")
    g.add_argument("--revision", default=None, help="a Hub commit or tag (pin it for reproducible results)")
    g.add_argument("--audio-column", default="audio", help="column holding the audio (default audio)")
    g.add_argument("--label-column", default="label", help="column holding the emotion (default label; none: "
                   "unlabelled)")
    g.add_argument("--text-column", default="text", help="column holding the transcript (default text; none: no "
                   "transcripts)")
    g.add_argument("--key-column", default="key", help="column naming each row (default key; rows of a dataset "
                   "without it are SPLIT/ROW)")
    g.add_argument("--label-map", nargs="+", default=[], metavar="RAW=LABEL",
                   help="rename the dataset's labels to the label set's (e.g. hap=joy ang=anger)")


def hf_source(args, command: str) -> dict:
    """The `hf` keyword arguments of :func:`emoq.data.splits.read_split` from the options above."""
    from ..config import ColumnMap

    if not args.path:
        raise SystemExit(f"emoq {command}: --dataset hf needs --path (a Hub id, a save_to_disk folder, an "
                         "audiofolder-style folder or data files)")
    label_map = {}
    for item in args.label_map:
        raw, sep, label = item.partition("=")
        if not sep or not raw or not label:
            raise SystemExit(f"emoq {command}: --label-map expects RAW=LABEL pairs, got {item!r}")
        label_map[raw] = label

    def column(value):
        return None if value is None or value.lower() == "none" else value

    columns = ColumnMap(audio=args.audio_column, label=column(args.label_column), text=column(args.text_column),
                        key=column(args.key_column))
    return {"path": args.path, "name": args.name, "revision": args.revision, "columns": columns,
            "label_map": label_map}
