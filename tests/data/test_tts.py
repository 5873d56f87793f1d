"""espeak-ng synthesis: real audio whose length and pitch follow the requested prosody."""

from __future__ import annotations

import numpy as np
import pytest
from support.environment import require_module

require_module("espeakng_loader", "pip install espeakng-loader")

from emoq.data.tts import NATIVE_SAMPLE_RATE, list_voices, synthesize  # noqa: E402


def estimate_f0(audio: np.ndarray, sr: int, fmin: float = 40.0, fmax: float = 400.0) -> float:
    """Median autocorrelation F0 over voiced 40 ms frames (good enough to rank two pitches)."""
    frame, hop = int(0.04 * sr), int(0.01 * sr)
    lag_min, lag_max = int(sr / fmax), int(sr / fmin)
    energy_floor = 0.1 * np.max(np.abs(audio))
    f0s = []
    for start in range(0, len(audio) - frame, hop):
        x = audio[start:start + frame].astype(np.float64)
        if np.max(np.abs(x)) < energy_floor:
            continue
        x = x - x.mean()
        ac = np.correlate(x, x, mode="full")[frame - 1:]
        if ac[0] <= 0:
            continue
        ac = ac / ac[0]
        lag = lag_min + int(np.argmax(ac[lag_min:lag_max]))
        if ac[lag] > 0.5:  # clearly periodic frames only
            f0s.append(sr / lag)
    assert f0s, "no voiced frames found"
    return float(np.median(f0s))


def test_audio_is_real_and_bounded():
    audio, sr = synthesize("Hello there, how are you today?")
    assert sr == NATIVE_SAMPLE_RATE
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.size > 0.5 * sr
    assert np.all(np.isfinite(audio))
    assert np.max(np.abs(audio)) <= 1.0
    assert np.std(audio) > 1e-3  # not silence


def test_longer_text_gives_longer_audio():
    short, _ = synthesize("Hello.")
    long, _ = synthesize("Hello. This sentence is quite a bit longer than the first one.")
    assert long.size > 2 * short.size


def test_lower_rate_gives_longer_audio():
    text = "The weather is lovely this afternoon."
    slow, _ = synthesize(text, rate=100)
    fast, _ = synthesize(text, rate=300)
    assert slow.size > 1.5 * fast.size


def test_higher_pitch_gives_higher_f0():
    text = "A long and steady vowel sound, aaah."
    low, sr = synthesize(text, pitch=10, pitch_range=0)
    high, _ = synthesize(text, pitch=90, pitch_range=0)
    f_low, f_high = estimate_f0(low, sr), estimate_f0(high, sr)
    assert 50 < f_low < f_high < 400
    assert f_high > 1.3 * f_low


def test_volume_scales_amplitude():
    quiet, _ = synthesize("Testing the volume.", volume=30)
    loud, _ = synthesize("Testing the volume.", volume=150)
    assert np.sqrt(np.mean(loud**2)) > 2 * np.sqrt(np.mean(quiet**2))


def test_resampling_gives_requested_rate():
    native, sr = synthesize("Resample me please.")
    audio, sr16 = synthesize("Resample me please.", sample_rate=16000)
    assert sr16 == 16000 and audio.dtype == np.float32
    assert abs(audio.size / 16000 - native.size / sr) < 0.01
    assert np.all(np.isfinite(audio)) and np.max(np.abs(audio)) <= 1.0


def test_voice_variant_and_errors():
    assert "en-us" in list_voices()
    female, _ = synthesize("Good morning.", voice="en-us+f3")
    assert female.size > 0
    with pytest.raises(ValueError):
        synthesize("x", voice="no-such-voice")
    with pytest.raises(ValueError):
        synthesize("   ")
