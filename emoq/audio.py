"""Audio decoding: any file -> 16 kHz mono float32, or an :class:`AudioError` that names the file.

- wav/flac/mp3/ogg (and the other libsndfile formats) are read with ``soundfile``; mp4/m4a/webm/
  mkv/mov (MELD clips are h264 + AAC 48 kHz stereo) with PyAV. When the first decoder cannot open a
  file the other one is tried, so a mislabelled extension still decodes.
- Multi-channel audio is averaged to mono and resampled to ``sr`` (``scipy.signal.resample_poly``
  for soundfile input, ffmpeg's resampler for PyAV input).
- Rejected with an :class:`AudioError` whose message is ``"<file>: <problem>"``: missing files,
  directories, empty files, bytes that no decoder understands (text, PDF, truncated headers), files
  with zero frames, audio with NaN/Inf samples (``soundfile`` returns those silently), audio shorter
  than ``min_seconds``. The decoder's own exception is summarised in the message, never re-raised.
- Long audio is kept whole unless ``max_seconds`` is given; then it is truncated and a warning is
  logged on the ``emoq.audio`` logger (never silently).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np

from .files import atomic_open

__all__ = [
    "SAMPLE_RATE",
    "AudioError",
    "AudioInfo",
    "load_audio",
    "load_audio_bytes",
    "is_stored_clip",
    "source_fingerprint",
    "audio_duration",
    "write_wav",
    "resample",
]

logger = logging.getLogger("emoq.audio")

#: Target rate of every speech encoder used here.
SAMPLE_RATE = 16000

#: Extensions decoded with PyAV first (containers libsndfile cannot open).
PYAV_EXTENSIONS = frozenset({".mp4", ".m4a", ".m4v", ".webm", ".mkv", ".mov", ".aac", ".avi", ".wma", ".3gp", ".ts"})


class AudioError(Exception):
    """An audio file (or byte string) that cannot be used; ``str(err)`` is ``"<name>: <problem>"``."""

    def __init__(self, name, problem: str):
        self.name = str(name)
        self.problem = problem
        super().__init__(f"{self.name}: {problem}")

    def __reduce__(self):  # picklable across process pools
        return (type(self), (self.name, self.problem))


@dataclass
class AudioInfo:
    """What :func:`load_audio` found out while decoding (``return_info=True``)."""

    decoder: str  # "soundfile" or "pyav"
    source_sample_rate: int
    source_channels: int
    source_duration: float | None  # seconds, before truncation (None when the container does not say)
    duration: float  # seconds of the returned array
    truncated: bool


class _CannotOpen(Exception):
    """Internal: this decoder does not understand the input (the next decoder is tried)."""


# ----------------------------------------------------------------------------- public API
def load_audio(
    path,
    sr: int = SAMPLE_RATE,
    max_seconds: float | None = None,
    min_seconds: float = 0.1,
    *,
    return_info: bool = False,
):
    """Decode ``path`` to a float32 mono array at ``sr`` Hz.

    ``path``: a file path, or a stored clip that is not a file of its own (an object with ``read_bytes()``
    and a ``name`` for messages, such as a row of a ``datasets`` dataset; see :func:`is_stored_clip`).
    ``max_seconds``: truncate longer audio (with a logged warning); ``None`` keeps everything.
    ``min_seconds``: shorter audio raises :class:`AudioError`. With ``return_info=True`` returns
    ``(audio, AudioInfo)``.
    """
    if is_stored_clip(path):
        return load_audio_bytes(path.read_bytes(), sr, max_seconds, min_seconds, name=path.name,
                                return_info=return_info)
    name, p = _existing_file(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise AudioError(name, f"cannot read file ({exc.strerror or exc})") from None
    if size == 0:
        raise AudioError(name, "empty file (0 bytes)")
    return _load(lambda: name, name, p.suffix.lower(), head, sr, max_seconds, min_seconds, return_info)


def is_stored_clip(source) -> bool:
    """Whether ``source`` is a clip held elsewhere than in a file of its own (it has ``read_bytes()`` and a
    ``name``, and is not a path): :func:`load_audio` decodes its bytes."""
    return not isinstance(source, (str, os.PathLike)) and callable(getattr(source, "read_bytes", None))


def source_fingerprint(source) -> list:
    """What identifies a clip's content for caches: a file's path, size and modification time, or a stored
    clip's own ``fingerprint``."""
    if is_stored_clip(source):
        return [source.name, source.fingerprint]
    return [str(source), os.path.getsize(source), os.path.getmtime(source)]


def _existing_file(path) -> tuple[str, Path]:
    """(name for messages, Path) of an audio path that exists and is not a folder, else AudioError."""
    name = os.fspath(path)
    p = Path(name)
    if not p.exists():
        raise AudioError(name, "file not found")
    if p.is_dir():
        raise AudioError(name, "is a directory, not an audio file")
    if not p.is_file():  # opening a FIFO blocks until a writer comes; a device never ends
        raise AudioError(name, "not a regular file (a FIFO, device or socket cannot be read as audio)")
    return name, p


def load_audio_bytes(
    data: bytes,
    sr: int = SAMPLE_RATE,
    max_seconds: float | None = None,
    min_seconds: float = 0.1,
    name: str = "<bytes>",
    *,
    return_info: bool = False,
):
    """Like :func:`load_audio` for an in-memory file (an upload, a blob). ``name`` labels errors
    and its extension (if any) picks the first decoder to try."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load_audio_bytes() needs bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise AudioError(name, "empty file (0 bytes)")
    return _load(lambda: io.BytesIO(data), name, Path(name).suffix.lower(), data[:64], sr, max_seconds,
                 min_seconds, return_info)


def audio_duration(path) -> float:
    """Duration of ``path`` in seconds, from the header when possible (no full decode)."""
    name, p = _existing_file(path)
    if p.stat().st_size == 0:
        raise AudioError(name, "empty file (0 bytes)")
    if p.suffix.lower() not in PYAV_EXTENSIONS:
        try:
            import soundfile as sf

            info = sf.info(name)
            if info.samplerate > 0 and info.frames >= 0:
                return info.frames / info.samplerate
        except Exception:  # noqa: BLE001 - fall through to PyAV
            pass
    try:
        import av

        with av.open(name) as container:
            if not container.streams.audio:
                raise AudioError(name, "no audio stream in the file")
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / av.time_base
    except AudioError:
        raise
    except Exception:  # noqa: BLE001 - last resort: decode and count
        pass
    audio = load_audio(name, sr=SAMPLE_RATE, min_seconds=0.0)
    return len(audio) / SAMPLE_RATE


def write_wav(path, audio: np.ndarray, sr: int = SAMPLE_RATE, subtype: str = "PCM_16") -> Path:
    """Write ``audio`` (float, mono) as a wav file atomically (temp file + rename).

    Samples outside [-1, 1] are clipped (16-bit PCM would wrap them around otherwise).
    """
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = np.asarray(audio, dtype=np.float32)
    if subtype.startswith("PCM"):
        audio = np.clip(audio, -1.0, 1.0)
    with atomic_open(path, "wb") as f:
        sf.write(f, audio, sr, subtype=subtype, format="WAV")
    return path


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling with an exact rational ratio (float32 in, float32 out)."""
    if orig_sr == target_sr:
        return np.asarray(audio, dtype=np.float32)
    from scipy.signal import resample_poly

    g = gcd(int(orig_sr), int(target_sr))
    return resample_poly(np.asarray(audio, dtype=np.float32), target_sr // g, orig_sr // g).astype(np.float32)


# ----------------------------------------------------------------------------- decoding
def _load(open_source, name, ext, head, sr, max_seconds, min_seconds, return_info):
    if sr is None or int(sr) <= 0:
        raise ValueError(f"sr must be a positive sample rate, got {sr!r}")
    sr = int(sr)
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive or None, got {max_seconds!r}")

    decoders = [("pyav", _decode_pyav), ("soundfile", _decode_soundfile)]
    if ext not in PYAV_EXTENSIONS:
        decoders.reverse()
    failures = []
    for decoder_name, decode in decoders:
        try:
            audio, native_sr, channels, source_duration, truncated = decode(open_source(), sr, max_seconds)
            break
        except _CannotOpen as exc:
            failures.append(f"{decoder_name}: {exc}")
    else:
        hint = _sniff(head)
        problem = f"not a decodable audio file{f' ({hint})' if hint else ''}"
        raise AudioError(name, f"{problem}; " + "; ".join(failures))

    if audio.size == 0:
        raise AudioError(name, "contains no audio samples (0 frames)")
    bad = int(np.count_nonzero(~np.isfinite(audio)))
    if bad:
        raise AudioError(name, f"contains {bad} non-finite sample(s) (NaN/Inf) out of {audio.size}")
    if decoder_name == "soundfile":
        audio = resample(audio, native_sr, sr)
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if max_seconds is not None and len(audio) > int(round(max_seconds * sr)):
        audio = audio[: int(round(max_seconds * sr))]
        truncated = True
    duration = len(audio) / sr
    if duration < min_seconds:
        raise AudioError(name, f"too short: {duration:.3f} s (minimum {min_seconds:g} s)")
    if truncated:
        total = f"{source_duration:.1f} s" if source_duration else f"more than {max_seconds:g} s"
        logger.warning("%s: audio is %s long; truncated to max_seconds=%g s", name, total, max_seconds)
    if not return_info:
        return audio
    return audio, AudioInfo(
        decoder=decoder_name,
        source_sample_rate=int(native_sr),
        source_channels=int(channels),
        source_duration=None if source_duration is None else float(source_duration),
        duration=duration,
        truncated=bool(truncated),
    )


def _decode_soundfile(source, sr, max_seconds):
    """-> (mono float32 at the native rate, native_sr, channels, source_duration, truncated)."""
    import soundfile as sf

    try:
        f = sf.SoundFile(source)
    except Exception as exc:  # noqa: BLE001 - libsndfile: "Format not recognised" and friends
        raise _CannotOpen(_describe(exc)) from None
    try:
        with f:
            native_sr, channels, total = int(f.samplerate), int(f.channels), int(f.frames)
            if native_sr <= 0:
                raise _CannotOpen(f"invalid sample rate {native_sr}")
            frames = total
            truncated = False
            if max_seconds is not None:
                # Read a little more than needed at the native rate; the exact cut happens at sr.
                limit = int(np.ceil(max_seconds * native_sr)) + native_sr // 10
                if total > limit:
                    frames, truncated = limit, True
            data = f.read(frames, dtype="float32", always_2d=True)
    except _CannotOpen:
        raise
    except Exception as exc:  # noqa: BLE001 - a header that lies about the data that follows
        raise _CannotOpen(f"read failed: {_describe(exc)}") from None
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    return mono, native_sr, channels, (total / native_sr if total > 0 else None), truncated


def _decode_pyav(source, sr, max_seconds):
    """-> (mono float32 already at ``sr``, native_sr, channels, source_duration, truncated)."""
    import av

    try:
        container = av.open(source, mode="r")
    except Exception as exc:  # noqa: BLE001 - av.error.InvalidDataError etc.
        raise _CannotOpen(_describe(exc)) from None
    try:
        with container:
            if not container.streams.audio:
                raise _CannotOpen("no audio stream in the file")
            stream = container.streams.audio[0]
            ctx = stream.codec_context
            native_sr = int(ctx.sample_rate or stream.rate or 0)
            channels = int(getattr(ctx, "channels", 0) or len(getattr(ctx.layout, "channels", ())) or 0)
            source_duration = None
            if stream.duration is not None and stream.time_base is not None:
                source_duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                source_duration = container.duration / av.time_base
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
            limit = None if max_seconds is None else int(round(max_seconds * sr)) + sr // 10
            chunks, n, truncated = [], 0, False
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler ignore timestamp gaps
                for out in resampler.resample(frame):
                    arr = out.to_ndarray().reshape(-1)
                    chunks.append(arr)
                    n += arr.size
                if limit is not None and n > limit:
                    truncated = True
                    break
            if not truncated:
                for out in resampler.resample(None):
                    arr = out.to_ndarray().reshape(-1)
                    chunks.append(arr)
                    n += arr.size
    except _CannotOpen:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt packets, truncated streams
        raise _CannotOpen(f"decoding failed: {_describe(exc)}") from None
    audio = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    return audio, native_sr, channels, source_duration, truncated


def _describe(exc: Exception) -> str:
    """One line from a decoder exception, without the file path it usually repeats."""
    text = getattr(exc, "error_string", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    text = " ".join(str(text).split())
    return text[:300]


def _sniff(head: bytes) -> str:
    """A hint about what non-audio bytes are (for the error message)."""
    if head.startswith(b"%PDF"):
        return "looks like a PDF document"
    if head[:4] in (b"PK\x03\x04",):
        return "looks like a zip archive"
    if head[:1] in (b"{", b"[") or head.lstrip()[:1] == b"<":
        kind = "JSON" if head[:1] in (b"{", b"[") else "HTML/XML"
        return f"looks like {kind} text"
    if head.startswith(b"RIFF") and len(head) < 44:
        return "truncated RIFF/WAV header"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    if text and sum(ch.isprintable() or ch in "\r\n\t" for ch in text) >= 0.95 * len(text):
        return "looks like a text file"
    return ""
