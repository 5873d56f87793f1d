"""Fixture builders for the data tests: synthetic audio files and small MELD / IEMOCAP trees.

Plain functions (not pytest fixtures) so each test builds exactly what it needs in ``tmp_path``.
Everything is generated here: sine tones and noise via numpy + soundfile, AAC-in-mp4 via PyAV.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import soundfile as sf


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file (a manifest, `emoq predict` output)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


MELD_HEADER = [
    "Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment",
    "Dialogue_ID", "Utterance_ID", "Season", "Episode", "StartTime", "EndTime",
]


def tone(seconds: float, sr: int = 16000, channels: int = 1, freq: float = 220.0, amp: float = 0.3) -> np.ndarray:
    """A sine tone (channels get different frequencies), shape (n,) or (n, channels)."""
    t = np.arange(int(round(seconds * sr))) / sr
    cols = [amp * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)]
    data = np.stack(cols, axis=1).astype(np.float32)
    return data[:, 0] if channels == 1 else data


def write_tone(path, seconds: float = 1.0, sr: int = 16000, channels: int = 1, subtype: str = "PCM_16",
               fmt: str | None = None, freq: float = 220.0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(seconds, sr, channels, freq), sr, subtype=subtype, format=fmt)
    return path


def write_mp4(path, seconds: float = 1.0, sr: int = 48000, channels: int = 2, freq: float = 330.0,
              video: bool = False) -> Path:
    """AAC audio in an mp4 container, like MELD clips; ``video=True`` adds a tiny h264 stream too."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = "stereo" if channels == 2 else "mono"
    data = tone(seconds, sr, channels, freq).reshape(-1, channels)
    with av.open(str(path), "w", format="mp4") as container:
        vstream = None
        if video:  # every stream is added before the first packet is muxed
            vstream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=24)
            vstream.width, vstream.height, vstream.pix_fmt = 64, 48, "yuv420p"
        stream = container.add_stream("aac", rate=sr)
        stream.layout = layout
        if vstream is not None:
            for i in range(int(seconds * 24)):
                frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), (i * 9) % 256, np.uint8), format="rgb24")
                for packet in vstream.encode(frame):
                    container.mux(packet)
        for start in range(0, len(data), 1024):
            chunk = np.ascontiguousarray(data[start : start + 1024].T)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate = sr
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for s in (vstream, stream):
            if s is not None:
                for packet in s.encode(None):
                    container.mux(packet)
    return path


def write_nonfinite_wav(path, value=np.nan, seconds: float = 1.0, sr: int = 16000) -> Path:
    data = tone(seconds, sr)
    data[100] = value
    data[2000] = value
    sf.write(path, data, sr, subtype="FLOAT")
    return Path(path)


def write_truncated_header(path) -> Path:
    """The first 30 bytes of a valid wav: RIFF header cut before the data chunk."""
    buf = io.BytesIO()
    sf.write(buf, tone(0.5), 16000, format="WAV", subtype="PCM_16")
    Path(path).write_bytes(buf.getvalue()[:30])
    return Path(path)


def write_zero_frames(path) -> Path:
    sf.write(path, np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    return Path(path)


PDF_BYTES = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n" + bytes(range(256)) * 4
TEXT_BYTES = b"This is not audio, it is a note someone saved with the wrong name.\n" * 20


def meld_row(sr_no, text, speaker, emotion, sentiment, dia, utt, season=1, episode=1,
             start="00:00:01,000", end="00:00:02,500") -> list:
    return [sr_no, text, speaker, emotion, sentiment, dia, utt, season, episode, start, end]


def write_meld_csv(path, rows, header=MELD_HEADER, newline: str = "\r\n", bom: bool = False,
                   encoding: str = "utf-8") -> Path:
    """RFC-4180 CSV like the official one (CRLF by default)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator=newline)
    writer.writerow(header)
    writer.writerows(rows)
    data = buf.getvalue().encode(encoding)
    Path(path).write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return Path(path)


MELD_FOLDERS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
MELD_CSV = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}


def build_meld_tree(root, splits: dict[str, list[tuple]], **csv_kwargs) -> Path:
    """``splits``: split -> list of ``(dia, utt, emotion, text, clip)`` where ``clip`` is a callable
    ``clip(path_without_extension) -> None`` that writes the clip (or None for a missing clip)."""
    root = Path(root)
    sentiments = {"joy": "positive", "surprise": "positive", "neutral": "neutral"}
    for split, entries in splits.items():
        folder = root / MELD_FOLDERS[split]
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, (dia, utt, emotion, text, clip) in enumerate(entries, start=1):
            rows.append(meld_row(i, text, f"Speaker{dia % 3}", emotion, sentiments.get(emotion, "negative"), dia, utt))
            if clip is not None:
                clip(folder / f"dia{dia}_utt{utt}")
        write_meld_csv(root / MELD_CSV[split], rows, **csv_kwargs)
    return root


def good_wav(seconds: float = 1.0, sr: int = 16000, channels: int = 1, subtype: str = "PCM_16"):
    return lambda stem: write_tone(stem.with_suffix(".wav"), seconds, sr, channels, subtype)


def good_mp4(seconds: float = 1.0, video: bool = False):
    return lambda stem: write_mp4(stem.with_suffix(".mp4"), seconds, video=video)


# ----------------------------------------------------------------------------------- IEMOCAP
#: per session: dialog suffix -> [(utterance suffix, code)]
IEMOCAP_DIALOGS = {
    "F_impro01": [("F000", "neu"), ("M000", "hap"), ("F001", "exc"), ("M001", "ang"), ("F002", "sad"),
                  ("M002", "fru"), ("F003", "xxx"), ("M003", "sur")],
    "M_script01_1": [("F000", "exc"), ("M000", "neu"), ("F001", "oth"), ("M001", "sad"), ("F002", "ang")],
}


def build_iemocap_tree(root, sessions=(1, 2, 3, 4, 5), write_wavs: bool = True, missing: tuple[str, ...] = ()) -> Path:
    """A tiny IEMOCAP_full_release: per session 13 evaluated utterances (see IEMOCAP_DIALOGS).

    iemocap4 keeps 9 per session (neu 2, happy 3 = hap 1 + exc 2, angry 2, sad 2);
    iemocap_patamia4 keeps 8 (ang 2, exc 2, neu 2, sad 2)."""
    root = Path(root)
    for s in sessions:
        base = root / f"Session{s}"
        (base / "dialog" / "EmoEvaluation" / "Categorical").mkdir(parents=True, exist_ok=True)
        (base / "dialog" / "transcriptions").mkdir(parents=True, exist_ok=True)
        # a file in a subfolder that must be ignored
        (base / "dialog" / "EmoEvaluation" / "Categorical" / "ignored.txt").write_text("[1.0 - 2.0]\tX\tbogus\n")
        for suffix, utts in IEMOCAP_DIALOGS.items():
            dialog = f"Ses{s:02d}{suffix}"
            eval_lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            trans_lines = []
            t = 1.0
            for utt_suffix, code in utts:
                utt = f"{dialog}_{utt_suffix}"
                eval_lines += [f"[{t:.4f} - {t + 1.5:.4f}]\t{utt}\t{code}\t[2.5000, 3.0000, 2.0000]",
                               "C-E1:\tNeutral;\t()", "A-E1:\tval 3; act 2; dom  2;\t()", ""]
                trans_lines.append(f"{utt} [{t:08.4f}-{t + 1.5:08.4f}]: Sentence number {utt_suffix}.")
                t += 2.0
                if write_wavs and utt not in missing:
                    write_tone(base / "sentences" / "wav" / dialog / f"{utt}.wav", 0.3)
            (base / "dialog" / "EmoEvaluation" / f"{dialog}.txt").write_text("\n".join(eval_lines) + "\n")
            (base / "dialog" / "transcriptions" / f"{dialog}.txt").write_text("\n".join(trans_lines) + "\n")
    return root
