"""Readers (MELD CSV, IEMOCAP EmoEvaluation, JSONL manifest) and the samplers."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from support.media import (
    IEMOCAP_DIALOGS,
    MELD_HEADER,
    build_iemocap_tree,
    build_meld_tree,
    good_mp4,
    good_wav,
    meld_row,
    write_meld_csv,
    write_tone,
)

from emoq.data import DatasetError, Utterance
from emoq.data.iemocap import IEMOCAP_PROTOCOLS, leave_one_session_out_folds, read_iemocap, split_by_sessions
from emoq.data.manifest import load_manifest_dataset, read_manifest, write_manifest
from emoq.data.meld import read_meld

# ------------------------------------------------------------------------------------- MELD


def _touch_wav(stem):
    write_tone(stem.with_suffix(".wav"), 0.2)


def test_meld_rows_labels_keys_in_csv_order(tmp_path):
    rows = [
        (0, 0, "neutral", "Hello, there.", good_wav(0.3)),
        (0, 1, "joy", 'He said "yes", twice.', good_mp4(0.3)),
        (0, 2, "surprise", "Line one\nline two", None),  # quoted newline; clip missing
        (1, 0, "anger", "Again?", _touch_wav),
    ]
    build_meld_tree(tmp_path, {"train": rows, "test": rows[:2]})
    utts = read_meld(tmp_path, "train")
    assert [u.key for u in utts] == ["train/dia0_utt0", "train/dia0_utt1", "train/dia0_utt2", "train/dia1_utt0"]
    assert [u.label for u in utts] == ["neutral", "joy", "surprise", "anger"]
    assert utts[1].text == 'He said "yes", twice.' and utts[2].text == "Line one\nline two"
    assert utts[0].audio.endswith("train_splits/dia0_utt0.wav")
    assert utts[1].audio.endswith("train_splits/dia0_utt1.mp4")
    # a row whose clip is missing is kept, with the expected official path
    assert utts[2].audio.endswith("train_splits/dia0_utt2.mp4") and utts[2].extra["audio_missing"] is True
    assert any("1 of 4 clip(s) not found" in w for w in utts.warnings)
    assert utts[0].extra["sentiment"] == "neutral" and utts[1].extra["sentiment"] == "positive"
    assert utts[0].speaker == "Speaker0" and utts[0].dialogue_id == "0" and utts[0].utterance_id == "0"
    assert utts[0].start == pytest.approx(1.0) and utts[0].end == pytest.approx(2.5)
    test = read_meld(tmp_path, "test")
    assert [u.key for u in test] == ["test/dia0_utt0", "test/dia0_utt1"]
    assert test[0].audio.endswith("output_repeated_splits_test/dia0_utt0.wav")
    assert Utterance.from_dict(utts[1].to_dict()) == utts[1]


def test_meld_prefers_wav_next_to_mp4(tmp_path):
    def both(stem):
        good_mp4(0.3)(stem)
        good_wav(0.3)(stem)

    build_meld_tree(tmp_path, {"dev": [(3, 4, "fear", "x", both)]})
    (u,) = read_meld(tmp_path, "dev")
    assert u.audio.endswith("dev_splits_complete/dia3_utt4.wav") and "audio_missing" not in u.extra
    (u,) = read_meld(tmp_path, "validation")  # split alias
    assert u.split == "dev"


def test_meld_sentiment_label_set(tmp_path):
    build_meld_tree(tmp_path, {"train": [(0, 0, "joy", "a", None), (0, 1, "anger", "b", None)]})
    utts = read_meld(tmp_path, "train", label_set="meld_sentiment3")
    assert [u.label for u in utts] == ["positive", "negative"]
    assert utts[0].extra["emotion"] == "joy"


@pytest.mark.parametrize("bom", [False, True])
@pytest.mark.parametrize("newline", ["\r\n", "\n"])
def test_meld_bom_and_line_endings(tmp_path, bom, newline):
    rows = [meld_row(1, "It’s fine, really…", "Ross", "neutral", "neutral", 0, 0),
            meld_row(2, "No.", "Rachel", "Sadness", "negative", 0, 1)]  # label case is tolerated
    write_meld_csv(tmp_path / "train_sent_emo.csv", rows, newline=newline, bom=bom)
    utts = read_meld(tmp_path, "train")
    assert [u.text for u in utts] == ["It’s fine, really…", "No."]
    assert [u.label for u in utts] == ["neutral", "sadness"]
    assert utts[0].extra["sr_no"] == "1"  # the BOM did not eat the first column name


def test_meld_c1_control_characters_map_to_cp1252_punctuation(tmp_path):
    text = "It\x92s \x93quoted\x94 \x96 and \x97 wait\x85"
    write_meld_csv(tmp_path / "train_sent_emo.csv", [meld_row(1, text, "Joey", "joy", "positive", 0, 0)])
    (u,) = read_meld(tmp_path, "train")
    assert u.text == "It’s “quoted” – and — wait…"


def test_meld_raw_cp1252_bytes_decode_with_a_warning(tmp_path, caplog):
    path = tmp_path / "train_sent_emo.csv"
    write_meld_csv(path, [meld_row(1, "Caf\u00e9 isn\u2019t open", "Monica", "neutral", "neutral", 0, 0),
                          meld_row(2, "Fine\u2014ok", "Monica", "neutral", "neutral", 0, 1)], encoding="cp1252")
    with caplog.at_level(logging.WARNING, logger="emoq.data.meld"):
        utts = read_meld(tmp_path, "train")
    assert [u.text for u in utts] == ["Café isn’t open", "Fine—ok"]
    assert any("not valid UTF-8" in r.getMessage() and "cp1252" in r.getMessage() for r in caplog.records)
    assert any("cp1252" in w for w in utts.warnings)


def test_meld_mixed_utf8_and_cp1252_bytes(tmp_path):
    path = tmp_path / "train_sent_emo.csv"
    write_meld_csv(path, [meld_row(1, "ok’ok", "A", "neutral", "neutral", 0, 0)])
    raw = path.read_bytes().replace(b"ok\xe2\x80\x99ok", b"ok\xe2\x80\x99ok and caf\xe9")
    path.write_bytes(raw)
    (u,) = read_meld(tmp_path, "train")
    assert u.text == "ok’ok and café"


def test_meld_unknown_emotion_names_file_row_and_value(tmp_path):
    rows = [meld_row(1, "a", "A", "neutral", "neutral", 0, 0), meld_row(2, "b", "B", "happyy", "positive", 0, 1)]
    path = write_meld_csv(tmp_path / "dev_sent_emo.csv", rows)
    with pytest.raises(DatasetError) as err:
        read_meld(tmp_path, "dev")
    message = str(err.value)
    assert str(path) in message and "row 2" in message and "line 3" in message and "'happyy'" in message
    assert "neutral, surprise" in message


def test_meld_missing_column(tmp_path):
    header = [c for c in MELD_HEADER if c != "Emotion"]
    path = write_meld_csv(tmp_path / "test_sent_emo.csv", [[1, "a", "A", "neutral", 0, 0, 1, 1, "x", "y"]],
                          header=header)
    with pytest.raises(DatasetError) as err:
        read_meld(tmp_path, "test")
    assert str(path) in str(err.value) and "'Emotion'" in str(err.value)


def test_meld_other_structural_errors(tmp_path):
    write_meld_csv(tmp_path / "train_sent_emo.csv", [meld_row(1, "a", "A", "joy", "positive", "x", 0)])
    with pytest.raises(DatasetError, match=r"row 1 .*Dialogue_ID/Utterance_ID must be integers"):
        read_meld(tmp_path, "train")
    write_meld_csv(tmp_path / "train_sent_emo.csv", [meld_row(1, "a", "A", "joy", "positive", 0, 0),
                                                     meld_row(2, "a", "A", "joy", "positive", 0, 0)])
    with pytest.raises(DatasetError, match="duplicate dia0_utt0"):
        read_meld(tmp_path, "train")
    write_meld_csv(tmp_path / "train_sent_emo.csv", [[1, "a", "A"]])
    with pytest.raises(DatasetError, match=r"row 1 \(line 2\): has 3 field"):
        read_meld(tmp_path, "train")
    (tmp_path / "dev_sent_emo.csv").write_bytes(b"")
    with pytest.raises(DatasetError, match="empty file"):
        read_meld(tmp_path, "dev")
    with pytest.raises(DatasetError, match="not found"):
        read_meld(tmp_path, "test")
    with pytest.raises(ValueError, match="unknown MELD split"):
        read_meld(tmp_path, "holdout")


# ---------------------------------------------------------------------------------- IEMOCAP


def test_iemocap4_counts_merge_and_text(tmp_path):
    build_iemocap_tree(tmp_path, missing=("Ses02F_impro01_F000",))
    utts = read_iemocap(tmp_path, "iemocap4")
    assert len(utts) == 5 * 9
    assert utts.label_counts() == Counter(neutral=10, happy=15, angry=10, sad=10)
    assert utts.excluded == Counter(fru=5, xxx=5, sur=5, oth=5)
    exc = [u for u in utts if u.extra["raw_label"] == "exc"]
    assert len(exc) == 10 and {u.label for u in exc} == {"happy"}
    first = utts[0]
    assert first.key == "Ses01F_impro01_F000" and first.split == "Session1" and first.label == "neutral"
    assert first.audio.endswith("Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav")
    assert first.text == "Sentence number F000." and first.speaker == "Ses01_F"
    assert first.start == pytest.approx(1.0) and first.extra["vad"] == [2.5, 3.0, 2.0]
    missing = [u for u in utts if u.extra.get("audio_missing")]
    assert [u.key for u in missing] == ["Ses02F_impro01_F000"]  # kept, flagged
    assert any("excluded by protocol" in w for w in utts.warnings)


def test_iemocap_patamia_is_a_separate_preset(tmp_path):
    build_iemocap_tree(tmp_path, write_wavs=False)
    utts = read_iemocap(tmp_path, "iemocap_patamia4")
    assert len(utts) == 5 * 8
    assert utts.label_counts() == Counter(angry=10, excited=10, neutral=10, sad=10)
    assert utts.excluded["hap"] == 5  # hap is not merged in this protocol
    (fold,) = IEMOCAP_PROTOCOLS["iemocap_patamia4"].folds
    train, test = split_by_sessions(utts, *fold)
    assert len(train) == 32 and len(test) == 8
    assert {u.split for u in test} == {"Session5"} and "Session5" not in {u.split for u in train}


def test_iemocap_loso_folds(tmp_path):
    folds = leave_one_session_out_folds()
    assert len(folds) == 5 and IEMOCAP_PROTOCOLS["iemocap4"].folds == tuple(folds)
    assert sorted(t for _, (t,) in folds) == [1, 2, 3, 4, 5]
    for train, test in folds:
        assert not set(train) & set(test) and set(train) | set(test) == {1, 2, 3, 4, 5}
    build_iemocap_tree(tmp_path, write_wavs=False)
    utts = read_iemocap(tmp_path)
    seen_test = []
    for train_s, test_s in folds:
        train, test = split_by_sessions(utts, train_s, test_s)
        assert not {u.key for u in train} & {u.key for u in test}
        assert len(train) + len(test) == len(utts)
        seen_test += [u.key for u in test]
    assert sorted(seen_test) == sorted(u.key for u in utts)  # every utterance tested exactly once
    with pytest.raises(ValueError, match="overlap"):
        split_by_sessions(utts, [1, 2], [2])


def test_iemocap_sessions_and_errors(tmp_path):
    build_iemocap_tree(tmp_path, sessions=(1, 2), write_wavs=False)
    assert len(read_iemocap(tmp_path, sessions=[2])) == 9
    assert len(read_iemocap(tmp_path)) == 18  # only the sessions present
    with pytest.raises(DatasetError, match="Session3 not found"):
        read_iemocap(tmp_path, sessions=[3])
    with pytest.raises(ValueError, match="unknown IEMOCAP protocol"):
        read_iemocap(tmp_path, protocol="iemocap6")
    bad = tmp_path / "Session1" / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt"
    bad.write_text(bad.read_text().replace("\tneu\t", "\tmeh\t", 1))
    with pytest.raises(DatasetError) as err:
        read_iemocap(tmp_path)
    assert str(bad) in str(err.value) and "line 3" in str(err.value) and "'meh'" in str(err.value)
    with pytest.raises(DatasetError, match="no IEMOCAP"):
        read_iemocap(tmp_path / "Session1")
    assert sum(len(v) for v in IEMOCAP_DIALOGS.values()) == 13


# --------------------------------------------------------------------------------- manifest


def test_manifest_read_relative_paths_and_free_fields(tmp_path):
    (tmp_path / "clips").mkdir()
    lines = [
        {"audio": "clips/a.wav", "label": "joy", "text": "hi", "speaker": "Ann", "mood": 3},
        {"audio": str(tmp_path / "abs.wav"), "label": None},
        {"audio": "~/x.wav", "key": "k3", "split": "other"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    utts = read_manifest(path)
    assert utts[0].audio == str(tmp_path.resolve() / "clips" / "a.wav")
    assert utts[0].label == "joy" and utts[0].text == "hi" and utts[0].extra == {"mood": 3}
    assert utts[0].key == "data/1" and utts[0].split == "data"
    assert utts[1].audio == str(tmp_path / "abs.wav") and utts[1].label is None
    assert utts[2].key == "k3" and utts[2].split == "other" and not utts[2].audio.startswith("~")
    assert [u.label for u in read_manifest(path, label_set="meld7")][:1] == ["joy"]


def test_manifest_errors_name_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"audio": "a.wav"}\n{"audio": "b.wav", oops}\n')
    with pytest.raises(DatasetError, match=r"m\.jsonl: line 2: invalid JSON"):
        read_manifest(path)
    path.write_text('{"audio": "a.wav"}\n{"label": "joy"}\n')
    with pytest.raises(DatasetError, match=r"m\.jsonl: line 2: missing required field 'audio'"):
        read_manifest(path)
    path.write_text('["a.wav"]\n')
    with pytest.raises(DatasetError, match="line 1: expected a JSON object"):
        read_manifest(path)
    path.write_text('{"audio": "a.wav", "label": "happyy"}\n')
    with pytest.raises(DatasetError, match="line 1: unknown label 'happyy'"):
        read_manifest(path, label_set="meld7")
    with pytest.raises(DatasetError, match="not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_manifest_round_trip_and_dataset(tmp_path, monkeypatch):
    utts = [
        Utterance("s/1", "s", str(tmp_path / "wav" / "1.wav"), "joy", text="a", extra={"duration": 1.5, "status": "ok"}),
        Utterance("s/2", "s", None, "anger", extra={"status": "error", "error": "x.mp4: empty file (0 bytes)"}),
        Utterance("s/3", "s", str(tmp_path / "wav" / "3.wav"), "fear", extra={"duration": 2.0, "status": "ok"}),
    ]
    path = write_manifest(utts, tmp_path / "s.jsonl")
    first = json.loads(path.read_text().splitlines()[0])
    assert first["audio"] == "wav/1.wav" and first["duration"] == 1.5  # relative, extra flattened
    back = read_manifest(path)
    assert [u.audio for u in back] == [str(tmp_path.resolve() / "wav" / "1.wav"), None,
                                      str(tmp_path.resolve() / "wav" / "3.wav")]
    assert back[1].extra["error"].endswith("empty file (0 bytes)")
    cache = tmp_path / "hf"
    ds, skipped = load_manifest_dataset(path, cache_dir=cache)
    assert skipped == 1 and len(ds) == 2 and ds["key"] == ["s/1", "s/3"]
    assert ds["duration"] == [1.5, 2.0] and ds["audio"][0].endswith("1.wav")  # paths, not decoded audio
    assert ds.cache_files and all(Path(f["filename"]).is_relative_to(cache) for f in ds.cache_files)  # on disk
    ds, skipped = load_manifest_dataset([path], skip_errors=False, label_set="meld7", cache_dir=cache)
    assert skipped == 0 and len(ds) == 3 and ds["status"] == ["ok", "error", "ok"]
    assert ds["label_id"] == [4, 6, 2]
    # cached: the same manifest and arguments are not parsed again; a changed manifest is
    import emoq.data.manifest as manifest_module

    def no_parsing(*args, **kwargs):
        raise AssertionError("the manifest was parsed again")

    monkeypatch.setattr(manifest_module, "read_manifest", no_parsing)
    again, skipped = load_manifest_dataset(path, cache_dir=cache)
    assert skipped == 1 and again["key"] == ["s/1", "s/3"]
    path.write_text(path.read_text() + "\n")
    with pytest.raises(AssertionError, match="parsed again"):
        load_manifest_dataset(path, cache_dir=cache)
    with pytest.raises(DatasetError, match="nope.jsonl: manifest not found"):
        load_manifest_dataset(tmp_path / "nope.jsonl", cache_dir=cache)


# --------------------------------------------------------------------------------- samplers


def test_length_grouped_batch_sampler():
    from emoq.data.sampling import LengthGroupedBatchSampler

    lengths = [((i * 37) % 101) / 10 for i in range(103)]
    s = LengthGroupedBatchSampler(lengths, batch_size=4, seed=1, mega_batch_mult=5)
    batches = list(s)
    assert len(batches) == len(s) == 26
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest batch first
    # grouping: within-batch spread is far below the global spread
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 2.0
    assert list(s) == batches  # deterministic for a given epoch
    s.set_epoch(1)
    assert list(s) != batches
    assert list(LengthGroupedBatchSampler(lengths, 4, seed=1, mega_batch_mult=5)) == batches
    dl = LengthGroupedBatchSampler(lengths, 4, drop_last=True)
    assert len(dl) == 25 and all(len(b) == 4 for b in dl)
    ordered = list(LengthGroupedBatchSampler(lengths, 4, shuffle=False))
    assert ordered == list(LengthGroupedBatchSampler(lengths, 4, shuffle=False, seed=9))


def test_batches_without_length_grouping_mix_lengths_and_reshuffle_every_epoch():
    """Clip length following the class (sorted lengths = sorted classes): grouped batches are one-class,
    ungrouped batches mix classes, and a new epoch deals new batches."""
    from emoq.data.sampling import LengthGroupedBatchSampler

    lengths = [float(i // 10) for i in range(40)]  # 4 classes of 10 clips, each class its own length
    classes_per_batch = lambda s: [len({lengths[i] for i in b}) for b in s]  # noqa: E731
    grouped = LengthGroupedBatchSampler(lengths, 5, seed=0)
    assert set(classes_per_batch(grouped)) == {1}
    mixed = LengthGroupedBatchSampler(lengths, 5, seed=0, group_by_length=False)
    assert sum(classes_per_batch(mixed)) / len(mixed) > 2.5
    first = list(mixed)
    mixed.set_epoch(1)
    assert list(mixed) != first and sorted(i for b in mixed for i in b) == list(range(40))


def test_length_grouped_batch_sampler_distributed():
    from emoq.data.sampling import LengthGroupedBatchSampler

    lengths = list(range(50))
    ranks = [list(LengthGroupedBatchSampler(lengths, 4, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == 5  # 13 batches -> 15 padded, 5 each
    covered = {i for r in ranks for b in r for i in b}
    assert covered == set(range(50))
    ranks = [list(LengthGroupedBatchSampler(lengths, 4, seed=3, num_replicas=3, rank=r, drop_last=True)) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]
    flat = [i for r in ranks for b in r for i in b]
    assert len(flat) == len(set(flat))  # no duplicates when dropping
    with pytest.raises(ValueError):
        LengthGroupedBatchSampler(lengths, 4, num_replicas=2, rank=2)


def test_class_balanced_sampler():
    import torch

    from emoq.data.sampling import ClassBalancedSampler

    labels = ["neutral"] * 90 + ["fear"] * 10 + [None] * 5
    s = ClassBalancedSampler(labels, num_samples=4000, seed=0)
    draws = list(s)
    assert len(draws) == len(s) == 4000
    counts = Counter(labels[i] for i in draws)
    assert None not in counts and abs(counts["fear"] - 2000) < 200  # balanced despite 9:1
    assert list(s) == draws
    s.set_epoch(2)
    assert list(s) != draws
    ranks = [ClassBalancedSampler(labels, num_samples=101, num_replicas=2, rank=r) for r in range(2)]
    assert [len(r) for r in ranks] == [51, 51] and [len(list(r)) for r in ranks] == [51, 51]
    loader = torch.utils.data.DataLoader(list(range(len(labels))), batch_size=10, sampler=ClassBalancedSampler(labels))
    assert sum(len(b) for b in loader) == len(labels)
    with pytest.raises(ValueError):
        ClassBalancedSampler([None, None])
