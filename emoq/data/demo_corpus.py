"""The offline demo corpus: synthesised emotional speech in the MELD layout, where the speech and the
words each carry half of the emotion.

No emotional speech corpus can be downloaded here, so the demo synthesises one with espeak-ng
(:func:`emoq.data.tts.synthesize`). Every emotion is a pair (acoustic group, lexical group):

- *how* a sentence is spoken gives its **acoustic group** (arousal): ``high`` (fast, high, wide
  pitch range, loud, tense voice), ``middle`` (moderate, modal voice) or ``low`` (slow, low, flat,
  quiet, breathy voice). See :data:`PROFILES` and :data:`VOICE_QUALITY`.
- *what* is said gives its **lexical group**: ``positive`` wording (things went well), ``negative``
  wording (things went badly) or ``neutral`` wording (plain facts). See :data:`SENTENCES`: one pool
  per lexical group, and no sentence names an emotion.

:data:`EMOTION_TABLE` (label set ``meld7``; two cells stay unused)::

                   positive words   negative words   neutral words
    high voice     surprise         anger            fear
    middle voice   joy              -                neutral
    low voice      -                sadness          disgust

Every group of either modality holds two or three emotions and every (acoustic, lexical) pair at most
one, so neither modality alone separates the classes (the best it can do is find the group: about
3/7 accuracy), while the pair identifies the emotion. Nothing else tells the emotions of a group
apart:

- all emotions of an acoustic group draw their prosody from the same jittered profile and voice
  quality, and every clip's loudness is set from its volume alone (:data:`REFERENCE_RMS`), whatever
  the words;
- all emotions of a lexical group speak the same pool, dealt from a shuffled deck per emotion so
  each emotion says each sentence equally often;
- speakers (espeak voice variants ``en-us+f3``, ``en-us+m3``...) are drawn independently of the label.

The three pools are built from the same sentence frames, so they sound alike: a positive sentence and
its negative twin use the same word stems (``friendly, ... undamaged`` / ``unfriendly, ... damaged``:
one ``un-`` each), and the neutral one fills the frame with plain facts of about the same length. The
last :data:`HELD_OUT` frames of every pool are spoken only in dev and test, so those splits hold
sentences never heard in training: the words must be understood (the valence stems recur across
frames), not recognised. Prosody statistics still pick up a little of the wording (log-mel
statistics of the stems), a bag of words none of the voice; see :mod:`emoq.evaluation.references`.

The metadata columns leak nothing beyond the words: ``Sentiment`` is the lexical group
(``positive``/``negative``/``neutral``), not the emotion's own sentiment, and ``StartTime``/``EndTime``
place each utterance on its dialogue's clock at a nominal rate (:data:`TIMELINE_WPM` words per
minute, whatever the clip's real speaking rate), so they do not carry the acoustic group.

The output is read by :func:`emoq.data.meld.read_meld` like the real corpus::

    OUT/train_sent_emo.csv  OUT/train_splits/dia{D}_utt{U}.wav          (16 kHz mono PCM-16)
    OUT/dev_sent_emo.csv    OUT/dev_splits_complete/dia{D}_utt{U}.wav
    OUT/test_sent_emo.csv   OUT/output_repeated_splits_test/dia{D}_utt{U}.wav
    OUT/demo_corpus.json    how it was made (version, table, profiles, pool sizes, seed, sizes)

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
import hashlib
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

__all__ = ["build_demo_corpus", "apply_voice_quality", "EMOTION_TABLE", "ACOUSTIC_GROUPS", "LEXICAL_GROUPS",
           "PROFILES", "VOICE_QUALITY", "VOICES", "SENTENCES", "CHUNK_SIZE", "DEFAULT_PER_CLASS", "HELD_OUT",
           "REFERENCE_RMS", "TIMELINE_WPM"]

logger = logging.getLogger("emoq.data.demo")

#: utterances per worker process (part of the corpus definition: see the module doc).
CHUNK_SIZE = 40
DEFAULT_PER_CLASS = {"train": 48, "dev": 8, "test": 12}
_VERSION = 3

ACOUSTIC_GROUPS = ("high", "middle", "low")
LEXICAL_GROUPS = ("positive", "negative", "neutral")

#: emotion -> (acoustic group, lexical group); a code: no two emotions share a pair.
EMOTION_TABLE: dict[str, tuple[str, str]] = {
    "surprise": ("high", "positive"),
    "anger": ("high", "negative"),
    "fear": ("high", "neutral"),
    "joy": ("middle", "positive"),
    "neutral": ("middle", "neutral"),
    "sadness": ("low", "negative"),
    "disgust": ("low", "neutral"),
}

#: acoustic group -> espeak prosody (rate wpm, pitch 0-100, pitch_range 0-100, volume 0-200).
PROFILES: dict[str, dict[str, float]] = {
    "high": {"rate": 210, "pitch": 72, "pitch_range": 85, "volume": 165},
    "middle": {"rate": 165, "pitch": 50, "pitch_range": 50, "volume": 110},
    "low": {"rate": 118, "pitch": 28, "pitch_range": 15, "volume": 70},
}
#: acoustic group -> voice quality, applied after synthesis (espeak has no per-utterance phonation
#: control): "breathy" adds aspiration noise that follows the speech envelope, "tense" soft-clips the
#: waveform, adding the harmonics of a pressed, harsh voice; "modal" leaves it as it is.
VOICE_QUALITY: dict[str, str] = {"high": "tense", "middle": "modal", "low": "breathy"}
#: speech RMS of a clip at volume 100 (espeak-ng's own level); a clip's RMS is set to this x volume / 100.
REFERENCE_RMS = 0.085
#: per-utterance jitter: rate and volume are scaled by U(1-j, 1+j); pitch and range get +-U(j).
JITTER = {"rate": 0.12, "volume": 0.15, "pitch": 8.0, "pitch_range": 12.0}
#: speaking rate of the CSV's StartTime/EndTime clock (words per minute), the same for every clip.
TIMELINE_WPM = 165
#: sentence frames per pool spoken only in dev and test (the last ones of each pool).
HELD_OUT = 12

#: (espeak voice, speaker name in the CSV).
VOICES: tuple[tuple[str, str], ...] = (
    ("en-us", "Sam"),
    ("en-us+f3", "Mia"),
    ("en-us+m3", "Leo"),
    ("en-us+f2", "Ada"),
    ("en-us+m7", "Tom"),
    ("en-us+f4", "Eve"),
    ("en-us+m2", "Max"),
)

#: lexical group -> its sentence pool, three pools of the same frames: sentence i of the positive pool
#: and sentence i of the negative pool swap the ``un-`` between the same two stems, sentence i of the
#: neutral pool states plain facts in the same frame. The last HELD_OUT of each are for dev and test.
SENTENCES: dict[str, tuple[str, ...]] = {
    "positive": (
        "The staff were friendly, and the car was undamaged.",
        "The hotel was comfortable, and the view was unspoiled.",
        "It was a pleasant trip, and the children came home unhurt.",
        "The plan was uncomplicated, and the result was successful.",
        "After the storm the old bridge was unbroken, and the road was safe.",
        "When we visited, our neighbor was kind and the garden was uncluttered.",
        "The players were fair, and the team was unbeaten.",
        "The guests were lucky, and the house was undamaged.",
        "I think the new phone is reliable, and its screen is unbroken.",
        "My brother was helpful, and my uncle was untroubled.",
        "The doctor was kind, and the child was unharmed.",
        "The company had a successful year, and the staff were untroubled.",
        "He is kind to his sister, and always unselfish.",
        "The engine was undamaged, and the mechanic was helpful.",
        "The neighbors were helpful, and the fence was unbroken.",
        "We were lucky with the weather, and the tent was undamaged.",
        "The teacher was helpful, and the lesson was uncomplicated.",
        "The kitchen is comfortable, and the shelves are uncluttered.",
        "The visit was pleasant, and my mother was untroubled.",
        "According to the report, the cargo was undamaged and the crew were friendly.",
        "The hospital was reliable, and the patients were unharmed.",
        "The road was safe, and the village was unspoiled.",
        "The interview was successful, and the questions were uncomplicated.",
        "At the new school the children were friendly, and the playground was uncluttered.",
        "The reply was kind, and the manager was untroubled.",
        "The hosts were helpful, and the other guests were unselfish.",
        "Everyone at the table was friendly, and the dishes were unbroken.",
        "The sailors were unhurt, and the boat was comfortable.",
        "The lawyer was reliable, and the case was uncomplicated.",
        "The match was fair, and the champion was unbeaten.",
        "The new manager is fair and unselfish.",
        "The waiter was friendly, and the service was uncomplicated.",
        "The evening was pleasant, and the rooms were uncluttered.",
        "She was kind to the team, and her answer was unselfish.",
        "The passengers were unhurt, and the bus driver was friendly.",
        "The seats were comfortable, and the boxes arrived undamaged.",
        "The landlord was fair, and the contract was uncomplicated.",
        "The hike was safe, and the forest was unspoiled.",
        "The referee was fair, and our team was unbeaten.",
        "My cousin was lucky, and his bike was unbroken.",
        "The nurse was kind, and the old man was unhurt.",
        "The system at work is reliable, and the files are undamaged.",
    ),
    "negative": (
        "The staff were unfriendly, and the car was damaged.",
        "The hotel was uncomfortable, and the view was spoiled.",
        "It was an unpleasant trip, and the children came home hurt.",
        "The plan was complicated, and the result was unsuccessful.",
        "After the storm the old bridge was broken, and the road was unsafe.",
        "When we visited, our neighbor was unkind and the garden was cluttered.",
        "The players were unfair, and the team was beaten.",
        "The guests were unlucky, and the house was damaged.",
        "I think the new phone is unreliable, and its screen is broken.",
        "My brother was unhelpful, and my uncle was troubled.",
        "The doctor was unkind, and the child was harmed.",
        "The company had an unsuccessful year, and the staff were troubled.",
        "He is unkind to his sister, and always selfish.",
        "The engine was damaged, and the mechanic was unhelpful.",
        "The neighbors were unhelpful, and the fence was broken.",
        "We were unlucky with the weather, and the tent was damaged.",
        "The teacher was unhelpful, and the lesson was complicated.",
        "The kitchen is uncomfortable, and the shelves are cluttered.",
        "The visit was unpleasant, and my mother was troubled.",
        "According to the report, the cargo was damaged and the crew were unfriendly.",
        "The hospital was unreliable, and the patients were harmed.",
        "The road was unsafe, and the village was spoiled.",
        "The interview was unsuccessful, and the questions were complicated.",
        "At the new school the children were unfriendly, and the playground was cluttered.",
        "The reply was unkind, and the manager was troubled.",
        "The hosts were unhelpful, and the other guests were selfish.",
        "Everyone at the table was unfriendly, and the dishes were broken.",
        "The sailors were hurt, and the boat was uncomfortable.",
        "The lawyer was unreliable, and the case was complicated.",
        "The match was unfair, and the champion was beaten.",
        "The new manager is unfair and selfish.",
        "The waiter was unfriendly, and the service was complicated.",
        "The evening was unpleasant, and the rooms were cluttered.",
        "She was unkind to the team, and her answer was selfish.",
        "The passengers were hurt, and the bus driver was unfriendly.",
        "The seats were uncomfortable, and the boxes arrived damaged.",
        "The landlord was unfair, and the contract was complicated.",
        "The hike was unsafe, and the forest was spoiled.",
        "The referee was unfair, and our team was beaten.",
        "My cousin was unlucky, and his bike was broken.",
        "The nurse was unkind, and the old man was hurt.",
        "The system at work is unreliable, and the files are damaged.",
    ),
    "neutral": (
        "The staff were outside, and the car was under the bridge.",
        "The hotel was near the station, and the view was of London.",
        "It was a trip to the coast, and the children came home by bus.",
        "The plan was drawn on Sunday, and the result was sent by mail.",
        "After the storm the old bridge was painted, and the road was new.",
        "When we visited, our neighbor was at lunch and the garden was wet.",
        "The players were in the hall, and the team was in red.",
        "The guests were up, and the house was in London.",
        "I think the new phone is black, and its screen is one inch wider.",
        "My brother was at work, and my uncle was in London.",
        "The doctor was on call, and the child was with her mother.",
        "The company had a new office, and the staff moved in on Monday.",
        "He is older than his sister, and works in London.",
        "The engine was made in Germany, and the mechanic was out.",
        "The neighbors were out, and the fence was painted.",
        "We checked the weather, and the tent was in one bag.",
        "The teacher was late, and the lesson was about the country.",
        "The kitchen is on the left, and the shelves are under the window.",
        "The visit was on Sunday, and my mother was at home.",
        "According to the report, the cargo was in one box and the crew on deck.",
        "The hospital was near the park, and the patients were upstairs.",
        "The road was narrow, and the village was under the hill.",
        "The interview was at one o'clock, and the questions were on paper.",
        "At the new school the children were at lunch, and the playground was behind it.",
        "The reply was short, and the manager read it on Monday.",
        "The hosts were upstairs, and the other guests were in the garden.",
        "Everyone at the table was waiting, and the dishes were on the counter.",
        "The sailors were from the north, and the boat was white.",
        "The lawyer was in court, and the case was number nine.",
        "The match was on Sunday, and the champion was tall.",
        "The new manager is tall and from London.",
        "The waiter was young, and the service was on the terrace at one.",
        "The evening was on Sunday, and the rooms were upstairs.",
        "She was at lunch with the team, and her answer came by email.",
        "The passengers were from the country, and the bus driver was new.",
        "The seats were numbered, and the boxes arrived on Monday.",
        "The landlord was away, and the contract was one page long.",
        "The hike was long, and the forest was under snow.",
        "The referee was from London, and our team wore blue.",
        "My cousin was at school, and his bike was in the shed.",
        "The nurse was in London, and the old man was asleep.",
        "The system at work is new, and the files are in one folder.",
    ),
}


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
        # Loudness follows the profile's volume only: the RMS is set, so the words spoken do not change it.
        rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if audio.size else 0.0
        if rms > 0:
            audio = (audio * (REFERENCE_RMS * params["volume"] / 100.0 / rms)).astype(np.float32)
        audio = audio + rng.standard_normal(len(audio)).astype(np.float32) * np.float32(10 ** (item["noise_db"] / 20))
        buf = io.BytesIO()
        sf.write(buf, np.clip(audio, -1.0, 1.0), sr, subtype="PCM_16", format="WAV")
        out.append(buf.getvalue())
    return out


def _prosody(group: str, rng: np.random.Generator) -> dict[str, int]:
    """One utterance's espeak parameters: the group's profile with per-utterance jitter."""
    base = PROFILES[group]
    return {
        "rate": int(round(base["rate"] * rng.uniform(1 - JITTER["rate"], 1 + JITTER["rate"]))),
        "pitch": int(np.clip(round(base["pitch"] + rng.uniform(-1, 1) * JITTER["pitch"]), 0, 100)),
        "pitch_range": int(np.clip(round(base["pitch_range"] + rng.uniform(-1, 1) * JITTER["pitch_range"]), 0, 100)),
        "volume": int(np.clip(round(base["volume"] * rng.uniform(1 - JITTER["volume"], 1 + JITTER["volume"])), 1, 200)),
    }


def _split_pool(pool: tuple[str, ...], split: str) -> tuple[str, ...]:
    """The sentences a split draws from: train the first ones, dev and test the last :data:`HELD_OUT`."""
    if not HELD_OUT:
        return pool
    return pool[:-HELD_OUT] if split == "train" else pool[-HELD_OUT:]


def _deal(decks: dict[str, list[str]], emotion: str, pool: tuple[str, ...], rng: np.random.Generator) -> str:
    """The next sentence of ``emotion``'s deck: the pool in a shuffled order, reshuffled when used up, so
    every emotion of a lexical group speaks the pool's sentences equally often."""
    deck = decks.setdefault(emotion, [])
    if not deck:
        deck.extend(pool[int(i)] for i in rng.permutation(len(pool)))
    return deck.pop()


def _plan(seed: int, per_class: dict[str, int], voices, noise_db: float) -> dict[str, list[dict]]:
    """Every utterance of every split: emotion, text, voice, prosody, dialogue position and clock."""
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
        decks: dict[str, list[str]] = {}
        dia = 0
        pos = 0
        while pos < len(labels):
            size = int(rng.integers(3, 9))
            pair = rng.choice(len(voices), size=2, replace=False)
            clock = float(rng.uniform(30, 1200))
            for utt, emotion in enumerate(labels[pos : pos + size]):
                voice, speaker = voices[int(pair[int(rng.integers(0, 2))])]
                acoustic, lexical = EMOTION_TABLE[emotion]
                params = _prosody(acoustic, rng)
                text = _deal(decks, emotion, _split_pool(SENTENCES[lexical], split), rng)
                span = len(text.split()) * 60.0 / TIMELINE_WPM  # nominal, not the clip's duration
                items.append({
                    "split": split, "dia": dia, "utt": utt, "emotion": emotion, "sentiment": lexical,
                    "text": text, "voice": voice, "speaker": speaker,
                    "params": params, "quality": VOICE_QUALITY[acoustic],
                    "seed": int(rng.integers(0, 2**31 - 1)), "noise_db": float(noise_db),
                    "season": 1 + (dia_offset + dia) % 10, "episode": 1 + (7 * (dia_offset + dia)) % 24,
                    "start": clock, "end": clock + span,
                })
                clock += span + 0.4
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


def _design() -> dict:
    """The label design as recorded in ``demo_corpus.json``: the table, both ways, and the pools."""
    grid = {a: {lex: None for lex in LEXICAL_GROUPS} for a in ACOUSTIC_GROUPS}
    for emotion, (acoustic, lexical) in EMOTION_TABLE.items():
        grid[acoustic][lexical] = emotion
    digest = hashlib.sha256(json.dumps(SENTENCES, sort_keys=True).encode("utf-8")).hexdigest()
    return {
        "table": grid,  # acoustic group -> lexical group -> emotion (null: unused cell)
        "emotion_groups": {e: {"acoustic": a, "lexical": lex} for e, (a, lex) in EMOTION_TABLE.items()},
        "sentence_pools": {g: len(SENTENCES[g]) for g in LEXICAL_GROUPS},
        "held_out_sentences": HELD_OUT,  # the last ones of each pool: dev and test only
        "sentences_sha256": digest,
        "reference_rms": REFERENCE_RMS,
        "sentiment_column": "lexical group",
        "timeline_wpm": TIMELINE_WPM,
    }


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
        "voices": [list(v) for v in voices], "profiles": PROFILES, "voice_quality": VOICE_QUALITY,
        "jitter": JITTER, "noise_db": float(noise_db), "chunk_size": CHUNK_SIZE, "label_set": "meld7",
        **_design(),
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
    k = 0
    for split, items in plan.items():
        clip_dir = out / MELD_SPLITS[split][1]
        clip_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for sr_no, item in enumerate(items, start=1):
            atomic_write_bytes(clip_dir / f"dia{item['dia']}_utt{item['utt']}.wav", wavs[k])
            k += 1
            rows.append([sr_no, item["text"], item["speaker"], item["emotion"], item["sentiment"], item["dia"],
                         item["utt"], item["season"], item["episode"], _fmt_time(item["start"]),
                         _fmt_time(item["end"])])
        buf = io.StringIO(newline="")
        writer = csv.writer(buf, lineterminator="\r\n")
        writer.writerow(MELD_COLUMNS)
        writer.writerows(rows)
        csv_path = out / MELD_SPLITS[split][0]
        csv_path.write_bytes(buf.getvalue().encode("utf-8"))
    atomic_write_text(info_path, json.dumps(info, indent=1, sort_keys=True) + "\n")
    logger.info("%s: demo corpus built (%d clips) in %.1f s", out, len(flat), time.perf_counter() - t0)
    return out
