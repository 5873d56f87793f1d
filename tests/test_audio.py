"""emoq.audio: every file decodes to 16 kHz mono float32, or fails with an AudioError naming it."""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest
import soundfile as sf
from support.media import (
    PDF_BYTES,
    TEXT_BYTES,
    write_mp4,
    write_nonfinite_wav,
    write_tone,
    write_truncated_header,
    write_zero_frames,
)

from emoq.audio import AudioError, audio_duration, load_audio, load_audio_bytes, write_wav


def _check(audio, seconds, tol=0.02):
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.isfinite(audio).all()
    assert abs(len(audio) / 16000 - seconds) <= tol, len(audio) / 16000


@pytest.mark.parametrize(
    "sr,channels,subtype,fmt,ext",
    [
        (16000, 1, "PCM_16", None, ".wav"),
        (48000, 2, "PCM_16", None, ".wav"),  # 48 kHz stereo
        (8000, 1, "PCM_U8", None, ".wav"),  # 8-bit 8 kHz
        (44100, 2, "FLOAT", None, ".wav"),
        (22050, 1, "PCM_16", "FLAC", ".flac"),
        (24000, 1, "VORBIS", "OGG", ".ogg"),
        (44100, 2, "MPEG_LAYER_III", "MP3", ".mp3"),
    ],
)
def test_formats_decode_to_16k_mono(tmp_path, sr, channels, subtype, fmt, ext):
    path = write_tone(tmp_path / f"a{ext}", 1.25, sr, channels, subtype, fmt)
    audio, info = load_audio(path, return_info=True)
    _check(audio, 1.25, tol=0.03)
    assert info.source_sample_rate == sr and info.source_channels == channels and not info.truncated
    assert 0.1 < np.abs(audio).max() <= 1.0  # levels preserved (a 0.3 tone, stereo averaged)


def test_resampled_tone_keeps_its_pitch(tmp_path):
    path = write_tone(tmp_path / "a.wav", 1.0, 48000, 1, freq=440.0)
    audio = load_audio(path)
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 440.0) < 2.0


@pytest.mark.parametrize("video", [False, True])
def test_mp4_aac_48k_stereo(tmp_path, video):
    path = write_mp4(tmp_path / "dia0_utt0.mp4", 1.5, video=video)  # MELD clips: h264 + AAC 48 kHz stereo
    audio, info = load_audio(path, return_info=True)
    _check(audio, 1.5, tol=0.05)  # AAC adds up to one frame of padding
    assert info.decoder == "pyav" and info.source_sample_rate == 48000 and info.source_channels == 2
    assert abs(audio_duration(path) - 1.5) < 0.05
    # from bytes, with and without an extension hint
    data = path.read_bytes()
    _check(load_audio_bytes(data, name="clip.mp4"), 1.5, tol=0.05)
    _check(load_audio_bytes(data), 1.5, tol=0.05)


def test_mislabelled_extension_still_decodes(tmp_path):
    wav = write_tone(tmp_path / "a.wav", 1.0)
    fake = tmp_path / "really_a_wav.mp4"
    fake.write_bytes(wav.read_bytes())
    _check(load_audio(fake), 1.0)


def _bad(tmp_path):
    cases = {}
    (tmp_path / "empty.wav").write_bytes(b"")
    cases["empty.wav"] = "empty file"
    write_truncated_header(tmp_path / "header.wav")
    cases["header.wav"] = "not a decodable audio file"
    write_zero_frames(tmp_path / "zero.wav")
    cases["zero.wav"] = "no audio samples"
    write_tone(tmp_path / "short.wav", 0.05)
    cases["short.wav"] = "too short: 0.050 s"
    write_nonfinite_wav(tmp_path / "nan.wav", np.nan)
    cases["nan.wav"] = "non-finite"
    write_nonfinite_wav(tmp_path / "inf.wav", np.inf)
    cases["inf.wav"] = "non-finite"
    (tmp_path / "text.wav").write_bytes(TEXT_BYTES)
    cases["text.wav"] = "looks like a text file"
    (tmp_path / "doc.wav").write_bytes(PDF_BYTES)
    cases["doc.wav"] = "looks like a PDF document"
    mp4 = write_mp4(tmp_path / "good.mp4", 1.0).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(mp4[: len(mp4) // 3])
    cases["cut.mp4"] = "not a decodable audio file"
    cases["missing.wav"] = "file not found"
    return cases


def test_bad_files_raise_audio_error_naming_the_file(tmp_path):
    for name, problem in _bad(tmp_path).items():
        path = tmp_path / name
        with pytest.raises(AudioError) as err:
            load_audio(path)
        message = str(err.value)
        assert message.startswith(str(path) + ": "), message
        assert problem in message, message
        assert "Traceback" not in message and "\n" not in message
        assert err.value.__cause__ is None  # the decoder's exception is summarised, not chained
        # picklable (crosses process pools) with the same message
        assert str(pickle.loads(pickle.dumps(err.value))) == message
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path)


def test_a_fifo_is_refused_instead_of_blocking_forever(tmp_path):
    """Opening a FIFO for reading blocks until a writer appears: a FIFO given as a clip hung `emoq predict`."""
    import threading

    fifo = tmp_path / "clip.wav"
    os.mkfifo(fifo)
    outcome = {}

    def load():
        try:
            load_audio(fifo)
        except AudioError as err:
            outcome["error"] = str(err)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # unblock the reader so the test process can end
        with open(fifo, "wb"):
            pass
        pytest.fail("load_audio blocked on a FIFO")
    assert outcome["error"] == f"{fifo}: not a regular file (a FIFO, device or socket cannot be read as audio)"
    with pytest.raises(AudioError, match="not a regular file"):
        audio_duration(fifo)


def test_bytes_errors_use_the_given_name():
    with pytest.raises(AudioError, match=r"^upload\.wav: empty file"):
        load_audio_bytes(b"", name="upload.wav")
    with pytest.raises(AudioError, match=r"^<bytes>: not a decodable audio file \(looks like a PDF"):
        load_audio_bytes(PDF_BYTES)


def test_min_seconds_is_configurable(tmp_path):
    path = write_tone(tmp_path / "short.wav", 0.05)
    assert len(load_audio(path, min_seconds=0.0)) == 800
    with pytest.raises(AudioError, match="minimum 0.5 s"):
        load_audio(write_tone(tmp_path / "b.wav", 0.3), min_seconds=0.5)


def test_long_audio_kept_or_truncated_with_warning(tmp_path, caplog):
    path = tmp_path / "long.wav"
    rng = np.random.default_rng(0)
    sf.write(path, (rng.standard_normal(16000 * 60) * 0.1).astype(np.float32), 16000)
    with caplog.at_level(logging.WARNING, logger="emoq.audio"):
        full = load_audio(path)
    assert len(full) == 16000 * 60 and not caplog.records  # None keeps everything, silently fine
    with caplog.at_level(logging.WARNING, logger="emoq.audio"):
        cut, info = load_audio(path, max_seconds=10, return_info=True)
    assert len(cut) == 160000 and info.truncated and info.source_duration == pytest.approx(60.0)
    np.testing.assert_allclose(cut, full[:160000], atol=1e-6)
    warnings = [r for r in caplog.records if r.name == "emoq.audio" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "truncated" in warnings[0].getMessage() and str(path) in warnings[0].getMessage()
    # also for a container decoded by PyAV
    mp4 = write_mp4(tmp_path / "long.mp4", 4.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="emoq.audio"):
        cut = load_audio(mp4, max_seconds=2.0)
    assert len(cut) == 32000 and any("truncated" in r.getMessage() for r in caplog.records)


def test_audio_duration_and_errors(tmp_path):
    assert audio_duration(write_tone(tmp_path / "a.wav", 2.0, 44100, 2)) == pytest.approx(2.0)
    with pytest.raises(AudioError, match="file not found"):
        audio_duration(tmp_path / "nope.wav")
    (tmp_path / "e.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty file"):
        audio_duration(tmp_path / "e.wav")


def test_write_wav_is_atomic_and_clips(tmp_path):
    out = write_wav(tmp_path / "sub" / "x.wav", np.array([0.0, 0.5, 2.0, -3.0] * 4000, dtype=np.float32))
    data, sr = sf.read(out, dtype="float32")
    assert sr == 16000 and data.max() <= 1.0 and data.min() >= -1.0
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.wav"]  # no temp file left behind


def test_argument_validation(tmp_path):
    path = write_tone(tmp_path / "a.wav", 1.0)
    with pytest.raises(ValueError):
        load_audio(path, max_seconds=0)
    with pytest.raises(ValueError):
        load_audio(path, sr=0)
    with pytest.raises(TypeError):
        load_audio_bytes("not bytes")
