"""emoq prepare: every input row in the manifest, bad media as readable error rows, resumable, parallel."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import soundfile as sf
from support.media import (
    PDF_BYTES,
    TEXT_BYTES,
    build_iemocap_tree,
    build_meld_tree,
    good_mp4,
    good_wav,
    read_jsonl,
    write_mp4,
    write_nonfinite_wav,
    write_tone,
    write_truncated_header,
    write_zero_frames,
)

from emoq.cli.prepare import add_parser
from emoq.data.manifest import load_manifest_dataset, read_manifest
from emoq.data.prepare import prepare


def _bytes(data: bytes, ext: str = ".wav"):
    return lambda stem: stem.with_suffix(ext).write_bytes(data)


def _cut_mp4(stem):
    full = write_mp4(stem.with_suffix(".mp4"), 1.0)
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 3])


def _long(stem):
    rng = np.random.default_rng(0)
    sf.write(stem.with_suffix(".wav"), (rng.standard_normal(16000 * 60) * 0.05).astype(np.float32), 16000)


# (dia, utt, emotion, text, clip writer, expected status, expected error fragment)
CASES = [
    (0, 0, "joy", "Good wav.", good_wav(1.0), "ok", None),
    (0, 1, "neutral", "48 kHz stereo.", good_wav(1.0, 48000, 2), "ok", None),
    (0, 2, "anger", "8-bit 8 kHz.", good_wav(1.0, 8000, 1, "PCM_U8"), "ok", None),
    (0, 3, "surprise", "h264 + AAC in mp4, \"quoted\".", good_mp4(1.0, video=True), "ok", None),
    (1, 0, "sadness", "Empty file.", _bytes(b"", ".mp4"), "error", "empty file"),
    (1, 1, "fear", "Truncated header.", lambda s: write_truncated_header(s.with_suffix(".wav")), "error",
     "not a decodable audio file"),
    (1, 2, "disgust", "Zero frames.", lambda s: write_zero_frames(s.with_suffix(".wav")), "error", "no audio samples"),
    (1, 3, "joy", "Too short.", good_wav(0.05), "error", "too short"),
    (2, 0, "neutral", "Sixty seconds.", _long, "ok", None),
    (2, 1, "anger", "NaN.", lambda s: write_nonfinite_wav(s.with_suffix(".wav"), np.nan), "error", "non-finite"),
    (2, 2, "anger", "Inf.", lambda s: write_nonfinite_wav(s.with_suffix(".wav"), np.inf), "error", "non-finite"),
    (2, 3, "fear", "Text bytes.", _bytes(TEXT_BYTES), "error", "looks like a text file"),
    (3, 0, "joy", "PDF bytes.", _bytes(PDF_BYTES), "error", "looks like a PDF document"),
    (3, 1, "sadness", "Missing clip.", None, "error", "file not found"),
    (3, 2, "neutral", "Corrupt mp4.", _cut_mp4, "error", "not a decodable audio file"),
    (3, 3, "surprise", "FLAC named wav? no, flac.", lambda s: write_tone(s.with_suffix(".flac"), 1.0, 22050, fmt="FLAC"),
     "ok", None),
]


@pytest.fixture(scope="module")
def meld_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("meld")
    build_meld_tree(root, {
        "train": [c[:5] for c in CASES],
        "dev": [(0, 0, "joy", "dev clip", good_wav(0.5)), (1, 0, "anger", "dev missing", None)],
    })
    return root


def test_prepare_meld_reports_every_row(meld_root, tmp_path, capsys):
    out = tmp_path / "out"
    report = prepare("meld", meld_root, out, workers=1)
    rows = read_jsonl(out / "train.jsonl")
    assert len(rows) == len(CASES)  # no row lost
    assert [r["key"] for r in rows] == [f"train/dia{c[0]}_utt{c[1]}" for c in CASES]
    for row, case in zip(rows, CASES, strict=True):
        expected_status, fragment = case[5], case[6]
        assert row["status"] == expected_status, (row["key"], row["error"])
        assert row["label"] == case[2] and row["text"] == case[3]
        assert set(row) >= {"key", "split", "dialogue_id", "utterance_id", "speaker", "text", "label", "audio",
                            "duration", "status", "error"}
        if expected_status == "ok":
            assert row["error"] is None
            wav = out / row["audio"]
            info = sf.info(str(wav))
            assert info.samplerate == 16000 and info.channels == 1
            assert row["duration"] == pytest.approx(info.frames / 16000)
        else:
            assert row["audio"] is None and row["duration"] is None
            assert fragment in row["error"]
            assert f"dia{case[0]}_utt{case[1]}" in row["error"]  # names the file
            assert "Traceback" not in row["error"]
    long_row = rows[8]
    assert long_row["duration"] == pytest.approx(60.0) and long_row["truncated"] is False  # kept whole
    assert len(read_jsonl(out / "dev.jsonl")) == 2
    n_ok = sum(c[5] == "ok" for c in CASES)
    assert report.ok == n_ok + 1 and report.error == len(CASES) - n_ok + 1 and report.exit_code == 0
    assert report.decoded == len(CASES) + 2 and report.reused == 0
    summary = capsys.readouterr().out
    assert f"{report.ok} ok, {report.error} error" in summary and "hours of audio" in summary
    assert "train/dia3_utt1:" in summary and "file not found" in summary
    # the dataset view skips (and counts) the error rows
    ds, skipped = load_manifest_dataset(out / "train.jsonl", cache_dir=tmp_path / "hf")
    assert len(ds) == n_ok and skipped == len(CASES) - n_ok
    assert all(p.endswith(".wav") for p in ds["audio"])
    # the manifest is relocatable and readable as a corpus
    utts = read_manifest(out / "train.jsonl")
    assert utts[0].audio == str((out / "wav" / "train" / "dia0_utt0.wav").resolve())


def test_prepare_is_resumable_and_parallel_matches_serial(meld_root, tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    first = prepare("meld", meld_root, serial, workers=1, quiet=True)
    wavs = sorted((serial / "wav").rglob("*.wav"))
    mtimes = {p: p.stat().st_mtime_ns for p in wavs}
    manifests = {split: (serial / f"{split}.jsonl").read_bytes() for split in ("train", "dev")}
    again = prepare("meld", meld_root, serial, workers=1, quiet=True)
    # nothing decoded: ok wavs untouched, failed clips whose source did not change stay failed
    assert again.decoded == 0 and again.reused == first.ok + first.error == len(CASES) + 2
    assert {p: p.stat().st_mtime_ns for p in wavs} == mtimes
    assert {split: (serial / f"{split}.jsonl").read_bytes() for split in ("train", "dev")} == manifests
    prepare("meld", meld_root, parallel, workers=2, quiet=True)
    for split in ("train", "dev"):
        assert (parallel / f"{split}.jsonl").read_bytes() == (serial / f"{split}.jsonl").read_bytes()
    for p in wavs:
        assert (parallel / p.relative_to(serial)).read_bytes() == p.read_bytes()
    # a damaged wav from an earlier run is decoded again
    wavs[0].write_bytes(b"garbage")
    third = prepare("meld", meld_root, serial, workers=1, quiet=True)
    assert third.decoded == 1 and sf.info(str(wavs[0])).samplerate == 16000


N_CLIPS = 1000
BAD = {7: None, 250: _bytes(TEXT_BYTES), 499: good_wav(0.05), 730: _bytes(b""), 999: None}  # index -> bad clip


@pytest.mark.slow
def test_prepare_1000_clips_two_workers_progress_and_no_work_on_rerun(tmp_path, capsys, monkeypatch):
    import emoq.data.prepare as prepare_mod
    from emoq.cli import main

    entries = []
    for i in range(N_CLIPS):
        clip = BAD[i] if i in BAD else good_wav(0.2 + 0.1 * (i % 11) / 10)  # 0.2 - 0.3 s
        entries.append((i // 10, i % 10, ("joy", "anger", "neutral")[i % 3], f"Clip {i}.", clip))
    root = build_meld_tree(tmp_path / "meld", {"train": entries})
    out = tmp_path / "out"
    pools = []

    class SpyPool(prepare_mod.ProcessPoolExecutor):
        def __init__(self, max_workers=None, **kwargs):
            pools.append(max_workers)
            super().__init__(max_workers=max_workers, **kwargs)

    monkeypatch.setattr(prepare_mod, "ProcessPoolExecutor", SpyPool)
    first = prepare("meld", root, out, workers=2, progress=True)
    captured = capsys.readouterr()
    assert pools == [2]  # decoded by a 2-process pool
    assert "decoding: 100%" in captured.err and f"{N_CLIPS}/{N_CLIPS}" in captured.err  # the progress bar
    rows = read_jsonl(out / "train.jsonl")
    assert len(rows) == N_CLIPS and [r["key"] for r in rows] == [f"train/dia{i // 10}_utt{i % 10}" for i in range(N_CLIPS)]
    assert {i for i, r in enumerate(rows) if r["status"] == "error"} == set(BAD)
    assert first.ok == N_CLIPS - len(BAD) and first.error == len(BAD) and first.decoded == N_CLIPS
    assert f"{N_CLIPS - len(BAD)} ok, {len(BAD)} error" in captured.out
    assert all(0.2 - 1e-6 <= r["duration"] <= 0.3 + 1e-6 for r in rows if r["status"] == "ok")
    manifest = (out / "train.jsonl").read_bytes()

    # second run, through the CLI with 2 workers: no decoding at all, the same manifest
    def no_decoding(*args, **kwargs):
        raise AssertionError("the second run decoded clips")

    monkeypatch.setattr(prepare_mod, "_run_jobs", no_decoding)
    assert main(["prepare", "meld", "--root", str(root), "--out", str(out), "--workers", "2"]) == 0
    assert f"(decoded 0, reused {N_CLIPS} from an earlier run)" in capsys.readouterr().out
    assert (out / "train.jsonl").read_bytes() == manifest and pools == [2]

    # failed clips whose file appears or changes are retried, and only those
    monkeypatch.undo()
    good_wav(0.25)(root / "train_splits" / "dia0_utt7")  # was missing
    good_wav(0.25)(root / "train_splits" / "dia25_utt0")  # was text bytes, same path
    third = prepare("meld", root, out, workers=1, quiet=True)
    assert third.decoded == 2 and third.reused == N_CLIPS - 2 and third.error == len(BAD) - 2
    rows = read_jsonl(out / "train.jsonl")
    assert rows[7]["status"] == rows[250]["status"] == "ok" and rows[499]["status"] == "error"


def test_prepare_max_seconds_truncates_and_lists(meld_root, tmp_path, caplog):
    out = tmp_path / "out"
    report = prepare("meld", meld_root, out, splits=["train"], workers=1, max_seconds=5.0, quiet=True)
    row = {r["key"]: r for r in read_jsonl(out / "train.jsonl")}["train/dia2_utt0"]
    assert row["status"] == "ok" and row["duration"] == pytest.approx(5.0) and row["truncated"] is True
    assert row["source_duration"] == pytest.approx(60.0)
    assert report.truncated == [("train/dia2_utt0", pytest.approx(60.0))]
    assert "truncated to --max-seconds: 1 clip(s): train/dia2_utt0" in report.summary()
    assert any("truncated" in r.getMessage() and "dia2_utt0" in r.getMessage() for r in caplog.records)
    assert not (out / "dev.jsonl").exists()  # only the requested split
    # changing the setting re-decodes instead of reusing 5 s wavs
    again = prepare("meld", meld_root, out, splits=["train"], workers=1, quiet=True)
    assert again.reused == 0
    row = {r["key"]: r for r in read_jsonl(out / "train.jsonl")}["train/dia2_utt0"]
    assert row["duration"] == pytest.approx(60.0)


def test_prepare_cli_hook_and_exit_codes(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="emoq")
    add_parser(parser.add_subparsers(dest="command"))
    root = build_meld_tree(tmp_path / "m", {"test": [(0, 0, "joy", "ok", good_wav(0.5)),
                                                     (0, 1, "joy", "missing", None)]})
    args = parser.parse_args(["prepare", "meld", "--root", str(root), "--out", str(tmp_path / "o"),
                              "--split", "test", "--workers", "1", "--no-progress"])
    assert args.func(args) == 0
    assert "1 ok, 1 error" in capsys.readouterr().out
    # nothing converts -> non-zero
    bad = build_meld_tree(tmp_path / "b", {"test": [(0, 0, "joy", "missing", None)]})
    args = parser.parse_args(["prepare", "meld", "--root", str(bad), "--out", str(tmp_path / "o2"), "--workers", "1"])
    assert args.func(args) == 1
    # a broken CSV -> a clear message, exit 2
    (bad / "test_sent_emo.csv").write_text("Sr No.,Utterance\r\n1,hi\r\n")
    assert args.func(args) == 2
    assert "missing required column" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "nope", "--root", "x", "--out", "y"])


def test_prepare_iemocap_by_session(tmp_path):
    root = build_iemocap_tree(tmp_path / "iemo", sessions=(1, 5), missing=("Ses05F_impro01_F000",))
    out = tmp_path / "out"
    report = prepare("iemocap", root, out, workers=1, quiet=True)
    assert set(report.manifests) == {"Session1", "Session5"}
    s5 = read_jsonl(out / "Session5.jsonl")
    assert len(s5) == 9 and sum(r["status"] == "error" for r in s5) == 1
    assert {r["label"] for r in s5} == {"neutral", "happy", "angry", "sad"}
    assert report.excluded == {"fru": 2, "xxx": 2, "sur": 2, "oth": 2}
    assert "excluded by protocol: fru 2, oth 2, sur 2, xxx 2" in report.summary()
    patamia = prepare("iemocap", root, tmp_path / "pat", splits=["Session5"], protocol="iemocap_patamia4",
                      workers=1, quiet=True)
    assert set(patamia.manifests) == {"Session5"}
    assert {r["label"] for r in read_jsonl(tmp_path / "pat" / "Session5.jsonl")} == {"angry", "excited", "neutral", "sad"}


def test_prepare_manifest_input(tmp_path):
    clips = tmp_path / "in"
    write_tone(clips / "a.wav", 1.0, 44100, 2)
    (clips / "b.wav").write_bytes(b"")
    (clips / "train.jsonl").write_text(
        json.dumps({"audio": "a.wav", "label": "joy", "text": "x"}) + "\n" + json.dumps({"audio": "b.wav"}) + "\n"
    )
    report = prepare("manifest", clips / "train.jsonl", tmp_path / "out", workers=1, quiet=True)
    rows = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert [r["status"] for r in rows] == ["ok", "error"] and report.ok == 1
    assert rows[0]["label"] == "joy" and rows[0]["audio"] == "wav/train/1.wav"
    with pytest.raises(ValueError, match="must differ"):
        prepare("manifest", clips / "train.jsonl", clips, quiet=True)
