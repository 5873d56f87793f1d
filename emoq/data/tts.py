"""Offline speech synthesis with espeak-ng, loaded through the ``espeakng-loader`` PyPI package.

Why this exists: the demo corpus and the tests need real speech with controllable prosody
(rate, pitch, pitch range, volume) and no network, no apt and no model download.
``espeakng-loader`` ships ``libespeak-ng`` plus its voice data as a wheel; a few ctypes
declarations are enough to drive it in "retrieval" mode, where espeak hands us PCM through a
callback instead of playing it.

espeak-ng keeps global state (current voice, parameters, callback), so every call is serialised
with one lock, and the library is initialised once, lazily, on first use.
"""

from __future__ import annotations

import ctypes
import threading
from functools import lru_cache

import numpy as np

__all__ = ["synthesize", "list_voices", "NATIVE_SAMPLE_RATE"]

#: espeak-ng's native output rate (what ``espeak_Initialize`` reports for the bundled voices).
NATIVE_SAMPLE_RATE = 22050

# Constants from speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # callback receives audio, espeak_Synth returns when done
_INITIALIZE_DONT_EXIT = 0x8000  # never call exit() inside the library on error
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_OK = 0
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4

# int callback(short *wav, int numsamples, espeak_EVENT *events); events are not needed here.
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _EspeakVoice(ctypes.Structure):
    """``espeak_VOICE`` from speak_lib.h (only read by :func:`list_voices`)."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_LOCK = threading.RLock()
_STATE: dict = {}  # "lib", "rate", "chunks", "callback" once initialised


def _load_library() -> ctypes.CDLL:
    """Open the bundled libespeak-ng and declare the few functions we call."""
    try:
        import espeakng_loader
    except ImportError as exc:  # pragma: no cover - exercised only without the package
        raise ImportError(
            "emoq.data.tts needs espeak-ng from PyPI: pip install espeakng-loader"
        ) from exc

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
        ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_EspeakVoice))

    data_path = espeakng_loader.get_data_path().encode()
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, _INITIALIZE_DONT_EXIT)
    if rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed (returned {rate}) with data path {data_path!r}")
    _STATE["rate"] = rate
    return lib


def _engine() -> ctypes.CDLL:
    """Initialise espeak-ng once; must be called with ``_LOCK`` held."""
    if "lib" not in _STATE:
        lib = _load_library()
        chunks: list[np.ndarray] = []

        def on_audio(wav, numsamples, _events):  # called from inside espeak_Synth
            if wav and numsamples > 0:
                chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
            return 0  # 0 = keep going

        callback = _SYNTH_CALLBACK(on_audio)  # keep a reference, or ctypes frees the trampoline
        lib.espeak_SetSynthCallback(callback)
        _STATE.update(lib=lib, chunks=chunks, callback=callback)
    return _STATE["lib"]


def _check(code: int, what: str) -> None:
    if code != _EE_OK:
        raise RuntimeError(f"espeak-ng {what} failed with error code {code}")


def synthesize(
    text: str,
    voice: str = "en-us",
    rate: int = 175,
    pitch: int = 50,
    pitch_range: int = 50,
    volume: int = 100,
    sample_rate: int | None = None,
) -> tuple[np.ndarray, int]:
    """Speak ``text`` and return ``(waveform, sample_rate)``.

    The waveform is float32 mono in [-1, 1] at espeak's native rate (22,050 Hz), or resampled
    with :func:`scipy.signal.resample_poly` to ``sample_rate`` when given (16,000 for speech
    encoders). ``rate`` is words per minute (80-450), ``pitch`` and ``pitch_range`` are 0-100
    (50 = voice default), ``volume`` is 0-200 (100 = normal). ``voice`` is an espeak voice name
    such as ``"en-us"``, ``"en"`` or a variant like ``"en-us+f3"``.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("synthesize() needs non-empty text")
    with _LOCK:
        lib = _engine()
        if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise ValueError(f"unknown espeak voice {voice!r}; see emoq.data.tts.list_voices()")
        # The voice is set first: loading a voice may reset pitch and range to its own defaults.
        _check(lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0), "SetParameter(rate)")
        _check(lib.espeak_SetParameter(_PARAM_VOLUME, int(volume), 0), "SetParameter(volume)")
        _check(lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0), "SetParameter(pitch)")
        _check(lib.espeak_SetParameter(_PARAM_RANGE, int(pitch_range), 0), "SetParameter(range)")

        chunks = _STATE["chunks"]
        chunks.clear()
        data = text.encode("utf-8") + b"\0"
        buf = ctypes.create_string_buffer(data, len(data))
        _check(
            lib.espeak_Synth(buf, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None),
            "Synth",
        )
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
        chunks.clear()
        native_rate = _STATE["rate"]

    audio = (pcm.astype(np.float32) / 32768.0).clip(-1.0, 1.0)
    if sample_rate is not None and int(sample_rate) != native_rate:
        audio = _resample(audio, native_rate, int(sample_rate))
        return audio, int(sample_rate)
    return audio, native_rate


def _resample(audio: np.ndarray, orig: int, target: int) -> np.ndarray:
    """Polyphase resampling (exact rational ratio), clipped back into [-1, 1]."""
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(orig, target)
    out = resample_poly(audio, target // g, orig // g)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


@lru_cache(maxsize=1)
def _voice_languages() -> tuple[str, ...]:
    with _LOCK:
        lib = _engine()
        voices = lib.espeak_ListVoices(None)
        found: set[str] = set()
        i = 0
        while voices[i]:
            langs = voices[i].contents.languages
            # ``languages`` is a list of (priority byte, NUL-terminated name), ending with a 0 byte;
            # c_char_p stops at the first NUL, so this reads the first (preferred) language only.
            if langs and len(langs) > 1:
                found.add(langs[1:].decode("utf-8", "replace"))
            i += 1
    return tuple(sorted(found))


def list_voices() -> list[str]:
    """Language/voice names accepted by :func:`synthesize` (e.g. ``"en-us"``, ``"fr-fr"``).

    Any of them can take a variant suffix such as ``"+f3"`` (female) or ``"+m2"``.
    """
    return list(_voice_languages())
