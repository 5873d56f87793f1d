"""`datasets` datasets as a corpus: save_to_disk folders, audiofolder-style folders and data files read into
the same Utterances as the MELD reader; labels by name; bad rows reported with their key."""

import io
import json

import datasets
import numpy as np
import pytest
import soundfile as sf
from support.corpora import make_tone_corpus_pair, tiny_test_config

from emoq.audio import AudioError, load_audio
from emoq.cli import main as cli
from emoq.config import ColumnMap
from emoq.data.collate import scan_utterances
from emoq.data.hf import read_hf
from emoq.data.meld import read_meld
from emoq.data.records import DatasetError


def _wav_bytes(seconds: float, hz: float) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def _dataset(rows: dict, label_names=None) -> datasets.Dataset:
    """A dataset built the way users build one offline: an audio column of {bytes, path}, cast (no decoding)."""
    dataset = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio(decode=False))
    if label_names is not None:
        dataset = dataset.cast_column("emotion", datasets.ClassLabel(names=label_names))
    return dataset


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    return make_tone_corpus_pair(tmp_path_factory.mktemp("tones"), {"train": 4, "dev": 2})


def test_save_to_disk_reads_the_same_utterances_and_audio_as_the_meld_reader(tones):
    root, hf = tones
    meld = read_meld(root, "dev")
    rows = read_hf(str(hf), "dev")  # "dev" finds the dataset's "validation" split
    assert [(u.key, u.label, u.text) for u in rows] == [(u.key, u.label, u.text) for u in meld]
    for a, b in zip(rows, meld):
        assert np.array_equal(load_audio(a.audio), load_audio(b.audio))
    assert str(rows[0].audio).startswith(f"{hf} [dev] dev/dia")  # errors name the dataset, split and key


def test_class_label_ids_are_read_by_name_not_position(tmp_path):
    names = ["anger", "joy", "neutral"]  # alphabetical: position 0 is anger here, neutral in meld7
    clips = [{"bytes": _wav_bytes(0.5, 200 + 50 * i), "path": f"c{i}.wav"} for i in range(3)]
    _dataset({"audio": clips, "emotion": [0, 1, 2]}, names).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict(test=_dataset({"audio": clips, "emotion": [0, 1, 2]}, names)).save_to_disk(str(tmp_path / "d"))
    rows = read_hf(str(tmp_path / "d"), "test", columns=ColumnMap(label="emotion", text=None))
    assert [u.label for u in rows] == ["anger", "joy", "neutral"]
    assert [u.key for u in rows] == ["test/0", "test/1", "test/2"]  # no key column: numbered rows
    with pytest.raises(DatasetError, match="holds one dataset without splits"):
        read_hf(str(tmp_path / "single"), "test", columns=ColumnMap(label="emotion", text=None))


def test_label_map_renames_and_an_unknown_label_names_the_value_row_and_valid_labels(tmp_path):
    names = ["ang", "hap", "neu", "xxx"]
    clips = [{"bytes": _wav_bytes(0.5, 300), "path": f"c{i}.wav"} for i in range(4)]
    rows = {"audio": clips, "emotion": [0, 1, 2, 3], "id": ["a", "b", "c", "d"]}
    datasets.DatasetDict(train=_dataset(rows, names)).save_to_disk(str(tmp_path / "d"))
    columns = ColumnMap(label="emotion", text=None, key="id")
    with pytest.raises(DatasetError) as err:
        read_hf(str(tmp_path / "d"), "train", columns=columns, label_map={"ang": "anger", "hap": "joy", "neu": "neutral"})
    message = str(err.value)
    assert "row 3 (d)" in message and "'xxx'" in message and "valid labels: neutral, surprise, fear" in message
    assert "row 0" not in message  # the mapped rows are fine
    rows["emotion"] = [0, 1, 2, 2]
    datasets.DatasetDict(train=_dataset(rows, names)).save_to_disk(str(tmp_path / "e"))
    got = read_hf(str(tmp_path / "e"), "train", columns=columns, label_map={"ang": "anger", "hap": "joy", "neu": "neutral"})
    assert [u.label for u in got] == ["anger", "joy", "neutral", "neutral"]


def test_a_corrupt_row_is_reported_with_its_key_never_dropped(tmp_path):
    clips = [{"bytes": _wav_bytes(0.5, 300), "path": "a.wav"}, {"bytes": b"RIFF\x00\x01garbage", "path": "b.wav"},
             {"bytes": _wav_bytes(0.5, 400), "path": "c.wav"}]
    rows = {"audio": clips, "label": ["joy", "anger", "neutral"], "key": ["k0", "k1", "k2"]}
    datasets.DatasetDict(test=_dataset(rows)).save_to_disk(str(tmp_path / "d"))
    utts = read_hf(str(tmp_path / "d"), "test", columns=ColumnMap(text=None))
    assert [u.key for u in utts] == ["k0", "k1", "k2"]
    scan = scan_utterances(utts)
    assert [u.key for u in scan.ok] == ["k0", "k2"]
    assert scan.errors[0][0] == "k1" and "not a decodable audio file" in scan.errors[0][1]
    with pytest.raises(AudioError, match=r"\[test\] k1 \(b\.wav\): not a decodable audio file"):
        load_audio(utts[1].audio)


def test_audiofolder_metadata_and_data_file_patterns(tmp_path):
    folder = tmp_path / "af"
    (folder / "test" / "clips").mkdir(parents=True)
    for i in range(2):
        (folder / "test" / "clips" / f"c{i}.wav").write_bytes(_wav_bytes(0.5, 300 + 100 * i))
    (folder / "test" / "metadata.csv").write_text(
        "file_name,emotion,utterance\nclips/c0.wav,hap,hello there\nclips/c1.wav,sad,oh no\n", encoding="utf-8")
    columns = ColumnMap(label="emotion", text="utterance")
    rows = read_hf(str(folder), "test", columns=columns, label_map={"hap": "joy"})
    assert [(u.label, u.text) for u in rows] == [("joy", "hello there"), ("sadness", "oh no")]
    assert rows[1].audio == str(folder / "test" / "clips" / "c1.wav")
    with pytest.raises(DatasetError, match=r"with split 'train'.*\(splits found: test\)"):
        read_hf(str(folder), "train", columns=columns)

    clips = [{"bytes": _wav_bytes(0.5, 250), "path": "x.wav"}]
    _dataset({"audio": clips, "label": ["anger"], "text": ["stop"]}).to_parquet(str(tmp_path / "test-00.parquet"))
    rows = read_hf(str(tmp_path / "{split}-*.parquet"), "test")
    assert [(u.label, u.text) for u in rows] == [("anger", "stop")]
    assert np.array_equal(load_audio(rows[0].audio), load_audio(_write(tmp_path, clips[0])))


def _write(tmp_path, clip) -> str:
    path = tmp_path / clip["path"]
    path.write_bytes(clip["bytes"])
    return str(path)


def test_missing_columns_and_splits_are_named(tones):
    _, hf = tones
    with pytest.raises(DatasetError, match=r"no column for label -> 'emotion' \(columns: .*label"):
        read_hf(str(hf), "train", columns=ColumnMap(label="emotion"))
    with pytest.raises(DatasetError, match=r"no split 'test' \(it has: train, validation\)"):
        read_hf(str(hf), "test")


def test_eval_gives_the_same_predictions_from_meld_and_from_hf(tones, saved_model, tmp_path):
    root, hf = tones
    assert cli(["eval", "--model", str(saved_model), "--dataset", "meld", "--root", str(root), "--split", "dev",
                "--out", str(tmp_path / "meld")]) == 0
    assert cli(["eval", "--model", str(saved_model), "--dataset", "hf", "--path", str(hf), "--split", "validation",
                "--out", str(tmp_path / "hf")]) == 0

    def rows(name):
        lines = (tmp_path / name / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
        return [{k: r[k] for k in ("key", "gold", "pred", "scores")} for r in map(json.loads, lines)]

    assert rows("meld") == rows("hf")
    protocol = json.loads((tmp_path / "hf" / "metrics.json").read_text(encoding="utf-8"))["protocol"]
    assert protocol["source"] == f"hf:{hf}[validation]"


@pytest.mark.parametrize("cached", [False, True])  # the demo caches stage 1's encoder frames
def test_training_reads_a_datasets_folder(tones, tmp_path, cached):
    from emoq.recipes import load_recipe

    root, hf = tones
    trainer = load_recipe("stage1_qformer")
    cfg = tiny_test_config(root, tmp_path, "data.dataset=hf", f"data.path={hf}", "trainer.max_steps=2",
                           "trainer.eval_every=2", f"stage1.cache_encoder_features={str(cached).lower()}")
    state = trainer.setup(cfg)
    assert len(state.loader.dataset) == 12 and len(state.dev.dataset) == 6
    if cached:  # clips stored as bytes in the dataset are fingerprinted by the dataset, not by a file
        assert sorted(state.loader.dataset.frame_cache) == sorted(u.key for u in read_meld(root, "train"))
    result = trainer.train(state)
    trainer.cleanup(state, result)
    assert result.step == 2 and result.history[-1]["weighted_f1"] is not None


def test_prepare_decodes_a_datasets_folder_once_and_reuses_it(tones, tmp_path):
    root, hf = tones
    out = tmp_path / "prepared"
    assert cli(["prepare", "hf", "--path", str(hf), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "validation.jsonl").read_text(encoding="utf-8").splitlines()]
    meld = read_meld(root, "dev")
    assert [(r["key"], r["label"], r["text"], r["status"]) for r in rows] == [(u.key, u.label, u.text, "ok")
                                                                               for u in meld]
    assert rows[0]["source"].startswith(f"{hf} [validation] dev/dia")
    assert np.array_equal(load_audio(out / rows[0]["audio"]), load_audio(meld[0].audio))
    wavs = {p: p.stat().st_mtime_ns for p in (out / "wav").rglob("*.wav")}
    assert len(wavs) == 18  # train 12 + validation 6
    assert cli(["prepare", "hf", "--path", str(hf), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "wav").rglob("*.wav")} == wavs  # nothing decoded again


def test_predict_reads_a_split_of_a_datasets_folder(tones, saved_model, tmp_path):
    _, hf = tones
    assert cli(["predict", "--model", str(saved_model), "--dataset", "hf", "--path", str(hf), "--split",
                "validation", "--out", str(tmp_path / "p.jsonl")]) == 0
    assert cli(["eval", "--model", str(saved_model), "--dataset", "hf", "--path", str(hf), "--split", "validation",
                "--out", str(tmp_path / "eval")]) == 0
    predicted = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    scored = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["key"], r["gold"], r["label"]) for r in predicted] == [(r["key"], r["gold"], r["pred"]) for r in scored]
