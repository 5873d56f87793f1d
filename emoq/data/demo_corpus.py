"""The offline demo corpus: synthesised emotional speech in the MELD layout.

No emotional speech corpus can be downloaded here, so the demo synthesises one with espeak-ng
(:func:`emoq.data.tts.synthesize`). The seven MELD emotions are expressed only through *how* a sentence
is spoken — speaking rate, pitch, pitch range, loudness and voice quality (breathy, tense or modal
phonation, see :data:`VOICE_QUALITY`) — with per-utterance random jitter, so the
classes overlap a little but stay learnable by listening (roughly: sadness slow/low/flat/quiet,
anger fast/loud/wide, joy fast-ish/high/wide, surprise very high/very wide, fear fast/high/flat/
quiet, disgust slow/low/wide, neutral in the middle). Sentences come from one neutral pool shared
by every emotion, so the transcript never gives the label away. Several voices (espeak variants
``en-us+f3``, ``en-us+m3``...) act as speakers.

The output is read by :func:`emoq.data.meld.read_meld` like the real corpus::

    OUT/train_sent_emo.csv  OUT/train_splits/dia{D}_utt{U}.wav          (16 kHz mono PCM-16)
    OUT/dev_sent_emo.csv    OUT/dev_splits_complete/dia{D}_utt{U}.wav
    OUT/test_sent_emo.csv   OUT/output_repeated_splits_test/dia{D}_utt{U}.wav
    OUT/demo_corpus.json    how it was made (seed, sizes, prosody profiles)

CSV columns are MELD's (``Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,
Season,Episode,StartTime,EndTime``), UTF-8, CRLF, RFC-4180 quoting.

Determinism: the same seed gives the same CSV and wav bytes. espeak-ng draws random numbers
(seeded per utterance here with ``espeak_ng_SetRandSeed``) *and* carries a little synthesis state
from one utterance to the next, so utterances are synthesised in fixed chunks of
:data:`CHUNK_SIZE`, each in a fresh worker process: the result does not depend on ``workers``.
"""

from __future__ import annotations

import csv
import ctypes
import io
import json
import logging
import multiprocessing
import time
from pathlib import Path

import numpy as np

from ..audio import SAMPLE_RATE
from ..files import atomic_write_bytes, atomic_write_text
from ..labels import get_label_set
from .meld import MELD_COLUMNS, MELD_SPLITS

__all__ = ["build_demo_corpus", "apply_voice_quality", "PROFILES", "VOICE_QUALITY", "VOICES", "SENTENCES",
           "CHUNK_SIZE", "DEFAULT_PER_CLASS"]

logger = logging.getLogger("emoq.data.demo")

#: utterances per worker process (part of the corpus definition: see the module doc).
CHUNK_SIZE = 40
DEFAULT_PER_CLASS = {"train": 48, "dev": 8, "test": 12}
_VERSION = 2

#: emotion -> espeak prosody (rate wpm, pitch 0-100, pitch_range 0-100, volume 0-200).
PROFILES: dict[str, dict[str, float]] = {
    "neutral": {"rate": 165, "pitch": 45, "pitch_range": 35, "volume": 100},
    "surprise": {"rate": 160, "pitch": 85, "pitch_range": 98, "volume": 135},
    "fear": {"rate": 235, "pitch": 75, "pitch_range": 15, "volume": 75},
    "sadness": {"rate": 115, "pitch": 25, "pitch_range": 10, "volume": 65},
    "joy": {"rate": 195, "pitch": 68, "pitch_range": 85, "volume": 125},
    "disgust": {"rate": 120, "pitch": 30, "pitch_range": 60, "volume": 110},
    "anger": {"rate": 210, "pitch": 42, "pitch_range": 70, "volume": 185},
}
#: emotion -> voice quality, applied after synthesis (espeak has no per-utterance phonation control):
#: "breathy" adds aspiration noise that follows the speech envelope (low-arousal / fearful voice),
#: "tense" soft-clips the waveform, adding the harmonics of a pressed, harsh voice; the rest is modal.
VOICE_QUALITY: dict[str, str] = {"fear": "breathy", "sadness": "breathy", "anger": "tense", "disgust": "tense"}
#: per-utterance jitter: rate and volume are scaled by U(1-j, 1+j); pitch and range get +-U(j).
JITTER = {"rate": 0.10, "volume": 0.12, "pitch": 7.0, "pitch_range": 10.0}
_SENTIMENT = {"neutral": "neutral", "joy": "positive", "surprise": None, "fear": "negative",
              "sadness": "negative", "disgust": "negative", "anger": "negative"}

#: (espeak voice, speaker name in the CSV).
VOICES: tuple[tuple[str, str], ...] = (
    ("en-us", "Sam"),
    ("en-us+f3", "Mia"),
    ("en-us+m3", "Leo"),
    ("en-us+f2", "Ada"),
    ("en-us+m7", "Tom"),
)

#: Emotion-neutral sentences, shared by every emotion (the words never give the label away).
SENTENCES: tuple[str, ...] = (
    "The meeting is on Tuesday at four.",
    "I put the keys on the kitchen table.",
    "She said the train leaves from platform two.",
    "We need three more chairs for the room.",
    "The package arrived this morning.",
    "He moved to a new apartment last week.",
    "The store closes at nine tonight.",
    "They painted the fence blue.",
    "My brother is coming over on Sunday.",
    "The report is in the second drawer.",
    "I will call you after lunch.",
    "The bus was ten minutes late.",
    "We are having pasta for dinner.",
    "The cat is sleeping on the couch.",
    "It rained all afternoon.",
    "You left your jacket in the car.",
    "The coffee machine is on the third floor.",
    "She bought a new lamp for the office.",
    "Our flight lands at seven in the evening.",
    "The dog needs to go for a walk.",
    "I found the letter under the door.",
    "He is reading the newspaper.",
    "The window in the bedroom is open.",
    "They changed the date of the party.",
    "I have two tickets for the game.",
    "The phone has been ringing all day.",
    "We drove to the coast on Saturday.",
    "The printer is out of paper.",
    "Your sister called while you were out.",
    "The movie starts at half past eight.",
    "I moved the boxes into the garage.",
    "He ordered a sandwich and a soda.",
    "The elevator stopped on the fifth floor.",
    "She is wearing the green sweater.",
    "The keys were in my other coat.",
    "We saw him at the restaurant.",
    "The neighbors got a new car.",
    "I left the book on your desk.",
    "The lights in the hallway are on.",
    "They are selling the old house.",
)


def _set_espeak_seed(seed: int) -> None:
    """Seed espeak-ng's random generator (breath/jitter noise) for the next utterance."""
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())  # same handle emoq.data.tts already opened
    fn = getattr(lib, "espeak_ng_SetRandSeed", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_long]
        fn.restype = None
        fn(int(seed) & 0x7FFFFFFF)


def apply_voice_quality(audio: np.ndarray, quality: str, rng: np.random.Generator, sr: int) -> np.ndarray:
    """"modal": unchanged; "breathy": + high-passed noise scaled by the 20 ms RMS envelope (silence stays
    silent); "tense": tanh soft clipping at 3x drive, rescaled to the original peak (adds odd harmonics)."""
    audio = np.asarray(audio, dtype=np.float32)
    if quality == "modal" or not audio.size:
        return audio
    if quality == "breathy":
        width = max(1, int(0.02 * sr))
        envelope = np.sqrt(np.convolve(audio.astype(np.float64) ** 2, np.ones(width) / width, mode="same"))
        noise = np.diff(rng.standard_normal(audio.size + 1))  # first difference: tilted towards high frequencies
        return (0.8 * audio + 0.5 * envelope * noise / noise.std()).astype(np.float32)
    if quality == "tense":
        peak = float(np.abs(audio).max()) or 1.0
        return (np.tanh(3.0 * audio / peak) / np.tanh(3.0) * peak).astype(np.float32)
    raise ValueError(f"unknown voice quality {quality!r} (modal, breathy, tense)")


def _synth_chunk(items: list[dict]) -> list[bytes]:
    """Worker: synthesise a chunk in this (fresh) process, return PCM-16 wav bytes per item."""
    import soundfile as sf

    from . import tts

    tts.list_voices()  # initialise espeak-ng before seeding it
    lock = getattr(tts, "_LOCK", None)
    out = []
    for item in items:
        params = item["params"]
        if lock is not None:
            with lock:  # re-entrant: synthesize() takes it again
                _set_espeak_seed(item["seed"])
                audio, sr = tts.synthesize(item["text"], voice=item["voice"], sample_rate=SAMPLE_RATE, **params)
        else:  # pragma: no cover
            _set_espeak_seed(item["seed"])
            audio, sr = tts.synthesize(item["text"], voice=item["voice"], sample_rate=SAMPLE_RATE, **params)
        rng = np.random.default_rng(item["seed"])
        audio = apply_voice_quality(audio, item["quality"], rng, sr)
        audio = audio + rng.standard_normal(len(audio)).astype(np.float32) * np.float32(10 ** (item["noise_db"] / 20))
        buf = io.BytesIO()
        sf.write(buf, np.clip(audio, -1.0, 1.0), sr, subtype="PCM_16", format="WAV")
        out.append(buf.getvalue())
    return out


def _plan(seed: int, per_class: dict[str, int], voices, noise_db: float) -> dict[str, list[dict]]:
    """Every utterance of every split: emotion, text, voice, prosody, dialogue position."""
    emotions = get_label_set("meld7").labels
    rng = np.random.default_rng(seed)
    plan: dict[str, list[dict]] = {}
    dia_offset = 0
    for split in MELD_SPLITS:
        n = int(per_class.get(split, 0))
        if n <= 0:
            continue
        labels = [e for e in emotions for _ in range(n)]
        labels = [labels[i] for i in rng.permutation(len(labels))]
        items: list[dict] = []
        dia = 0
        pos = 0
        while pos < len(labels):
            size = int(rng.integers(3, 9))
            pair = rng.choice(len(voices), size=2, replace=False)
            for utt, emotion in enumerate(labels[pos : pos + size]):
                voice, speaker = voices[int(pair[int(rng.integers(0, 2))])]
                base = PROFILES[emotion]
                params = {
                    "rate": int(round(base["rate"] * rng.uniform(1 - JITTER["rate"], 1 + JITTER["rate"]))),
                    "pitch": int(np.clip(round(base["pitch"] + rng.uniform(-1, 1) * JITTER["pitch"]), 0, 100)),
                    "pitch_range": int(np.clip(round(base["pitch_range"] + rng.uniform(-1, 1) * JITTER["pitch_range"]),
                                               0, 100)),
                    "volume": int(np.clip(round(base["volume"] * rng.uniform(1 - JITTER["volume"], 1 + JITTER["volume"])),
                                          1, 200)),
                }
                sentiment = _SENTIMENT[emotion] or ("positive" if rng.random() < 0.5 else "negative")
                items.append({
                    "split": split, "dia": dia, "utt": utt, "emotion": emotion, "sentiment": sentiment,
                    "text": SENTENCES[int(rng.integers(0, len(SENTENCES)))], "voice": voice, "speaker": speaker,
                    "params": params, "quality": VOICE_QUALITY.get(emotion, "modal"),
                    "seed": int(rng.integers(0, 2**31 - 1)), "noise_db": float(noise_db),
                    "season": 1 + (dia_offset + dia) % 10, "episode": 1 + (7 * (dia_offset + dia)) % 24,
                    "dia_start": float(rng.uniform(30, 1200)),
                })
            pos += size
            dia += 1
        dia_offset += dia
        plan[split] = items
    return plan


def _fmt_time(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def _pool_context():
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["numpy", "scipy.signal", "soundfile", "emoq.data.tts"])
        return ctx
    return multiprocessing.get_context("spawn")


def build_demo_corpus(
    out_dir,
    seed: int = 0,
    per_class: dict[str, int] | None = None,
    voices: tuple[tuple[str, str], ...] = VOICES,
    workers: int = 2,
    noise_db: float = -60.0,
    overwrite: bool = False,
) -> Path:
    """Synthesise the demo corpus into ``out_dir`` (MELD layout) and return ``out_dir``.

    ``per_class``: utterances per emotion per split (default 48 / 8 / 12 for train / dev / test:
    336 / 56 / 84 clips). ``voices``: ``(espeak voice, speaker name)`` pairs. ``noise_db``: level of
    a faint seeded noise floor (dBFS). An existing corpus built with the same settings is reused
    unless ``overwrite``.
    """
    out = Path(out_dir)
    per_class = dict(DEFAULT_PER_CLASS if per_class is None else per_class)
    unknown = set(per_class) - set(MELD_SPLITS)
    if unknown:
        raise ValueError(f"per_class has unknown split(s) {sorted(unknown)}; expected {list(MELD_SPLITS)}")
    voices = tuple((str(v), str(s)) for v, s in voices)
    if len(voices) < 2:
        raise ValueError("build_demo_corpus needs at least two voices")
    info = {
        "version": _VERSION, "seed": int(seed), "per_class": per_class, "sample_rate": SAMPLE_RATE,
        "voices": [list(v) for v in voices], "profiles": PROFILES, "voice_quality": VOICE_QUALITY, "jitter": JITTER, "noise_db": float(noise_db),
        "chunk_size": CHUNK_SIZE, "label_set": "meld7",
    }
    info_path = out / "demo_corpus.json"
    if not overwrite and info_path.is_file():
        try:
            existing = json.loads(info_path.read_text())
        except ValueError:
            existing = None
        if existing == info and all((out / MELD_SPLITS[s][0]).is_file() for s in per_class if per_class[s] > 0):
            logger.info("%s: demo corpus already built with these settings", out)
            return out

    t0 = time.perf_counter()
    plan = _plan(int(seed), per_class, voices, noise_db)
    flat = [item for items in plan.values() for item in items]
    chunks = [flat[i : i + CHUNK_SIZE] for i in range(0, len(flat), CHUNK_SIZE)]
    # maxtasksperchild=1: every chunk starts from a fresh espeak-ng (see the module doc).
    with _pool_context().Pool(processes=max(1, min(int(workers), len(chunks))), maxtasksperchild=1) as pool:
        wavs = [w for chunk_wavs in pool.map(_synth_chunk, chunks, chunksize=1) for w in chunk_wavs]

    out.mkdir(parents=True, exist_ok=True)
    import soundfile as sf

    k = 0
    for split, items in plan.items():
        clip_dir = out / MELD_SPLITS[split][1]
        clip_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        clock: dict[int, float] = {}
        for sr_no, item in enumerate(items, start=1):
            data = wavs[k]
            k += 1
            path = clip_dir / f"dia{item['dia']}_utt{item['utt']}.wav"
            atomic_write_bytes(path, data)
            duration = sf.info(io.BytesIO(data)).duration
            start = clock.get(item["dia"], item["dia_start"])
            end = start + duration
            clock[item["dia"]] = end + 0.4
            rows.append([sr_no, item["text"], item["speaker"], item["emotion"], item["sentiment"], item["dia"],
                         item["utt"], item["season"], item["episode"], _fmt_time(start), _fmt_time(end)])
        buf = io.StringIO(newline="")
        writer = csv.writer(buf, lineterminator="\r\n")
        writer.writerow(MELD_COLUMNS)
        writer.writerows(rows)
        csv_path = out / MELD_SPLITS[split][0]
        csv_path.write_bytes(buf.getvalue().encode("utf-8"))
    atomic_write_text(info_path, json.dumps(info, indent=1, sort_keys=True) + "\n")
    logger.info("%s: demo corpus built (%d clips) in %.1f s", out, len(flat), time.perf_counter() - t0)
    return out
