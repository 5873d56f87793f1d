"""Multi-turn chat: earlier turns stay in the prompt, the clip is injected once, `emoq chat` keeps the history
and reads each clip's transcript (given, or transcribed once) and says which."""

import io

import numpy as np
import pytest
import torch
from support.asr import CountingTranscriber

from emoq.audio import write_wav
from emoq.cli import main as cli
from emoq.inference import EmotionRecognizer


def test_history_renders_alternating_turns_with_the_clip_once(tiny):
    _, processor = tiny()
    msgs = processor.messages("and why?", "hello there", history=[("how do they feel?", "joy")])
    roles = [m["role"] for m in msgs if m["role"] != "system"]
    assert roles == ["user", "assistant", "user"]
    first, answer, second = (m["content"] for m in msgs if m["role"] != "system")
    assert first.startswith("<|emoq|>") and "hello there" in first and first.endswith("how do they feel?")
    assert answer == "joy" and second == "and why?"
    assert sum(m["content"].count("<|emoq|>") for m in msgs) == 1
    # no history: the single-turn prompt of training and label scoring, unchanged
    assert processor.messages("q", None) == processor.messages("q", None, history=())


def test_second_turn_prompt_holds_the_first_answer_and_one_set_of_queries(tiny, clips):
    model, processor = tiny()
    one = processor([clips[0]], questions=["how do they feel?"], padding_side="left")
    two = processor([clips[0]], questions=["why?"], padding_side="left",
                    histories=[[("how do they feel?", "joyful indeed")]])
    audio_id = processor.audio_token_id
    assert (one["input_ids"] == audio_id).sum() == (two["input_ids"] == audio_id).sum() == processor.num_query_tokens
    text = processor.tokenizer.decode(two["input_ids"][0])
    assert text.index("how do they feel?") < text.index("joyful indeed") < text.index("why?")
    rec = EmotionRecognizer(model, processor, device="cpu")
    with torch.no_grad():  # the history changes what the model sees, so the next-token distribution moves
        logits_one = model(**{k: v for k, v in one.items() if k != "labels"}).logits[0, -1]
        logits_two = model(**{k: v for k, v in two.items() if k != "labels"}).logits[0, -1]
    assert not torch.allclose(logits_one, logits_two)
    streamed = "".join(rec.chat((clips[0], 16000), "why?", stream=True, max_new_tokens=5,
                                history=[("how do they feel?", "joyful indeed")]))
    whole = rec.chat((clips[0], 16000), "why?", max_new_tokens=5, history=[("how do they feel?", "joyful indeed")])
    assert streamed.strip() == whole


@pytest.fixture
def saved(tiny, tmp_path):
    model, processor = tiny(lora={"r": 4}, seed=1)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    rng = np.random.default_rng(0)
    a = write_wav(tmp_path / "a.wav", (rng.standard_normal(16000) * 0.1).astype(np.float32))
    b = write_wav(tmp_path / "b.wav", (rng.standard_normal(24000) * 0.1).astype(np.float32))
    return tmp_path / "m", a, b


def test_interactive_session_keeps_history_until_the_clip_changes(saved, tmp_path, monkeypatch, capsys):
    model_dir, a, b = saved
    seen = []
    original = EmotionRecognizer.chat

    def spy(self, audio, question, **kwargs):
        seen.append((question, list(kwargs["history"]), len(audio)))
        return original(self, audio, question, **kwargs)

    monkeypatch.setattr(EmotionRecognizer, "chat", spy)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    script = f"first?\nsecond?\n/audio {bad}\n/audio {b}\nthird?\n/reset\nfourth?\n/quit\nnever\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert cli(["chat", "--model", str(model_dir), "--audio", str(a), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert [q for q, _, _ in seen] == ["first?", "second?", "third?", "fourth?"]
    assert seen[0][1] == [] and [q for q, _ in seen[1][1]] == ["first?"]
    assert seen[2][1] == [] and seen[2][2] == 24000  # a new clip starts a new conversation
    assert seen[3][1] == []  # /reset
    assert "bad.wav" in out and "still on the previous clip" in out


def test_one_shot_chat_on_a_bad_file_is_a_clear_error(saved, tmp_path):
    model_dir, _, _ = saved
    bad = tmp_path / "empty.wav"
    bad.write_bytes(b"")
    with pytest.raises(SystemExit) as err:
        cli(["chat", "--model", str(model_dir), "--audio", str(bad), "how?"])
    assert "empty.wav" in str(err.value) and "empty" in str(err.value)


def test_a_crash_inside_streaming_generate_is_raised_not_hung(tiny, clips, monkeypatch):
    model, processor = tiny()
    rec = EmotionRecognizer(model, processor, device="cpu")

    def boom(**kwargs):
        raise RuntimeError("generate failed")

    monkeypatch.setattr(model, "generate", boom)
    with pytest.raises(RuntimeError, match="generate failed"):
        list(rec.chat((clips[0], 16000), "how?", stream=True))


def test_chat_reads_the_asr_transcript_once_per_clip_and_says_so(saved, monkeypatch, capsys):
    from emoq.asr import Transcriber
    from emoq.inference import Transcript

    model_dir, a, b = saved
    asr = CountingTranscriber()
    monkeypatch.setattr(Transcriber, "from_pretrained", staticmethod(lambda ref, device=None, **kw: asr))
    texts = []
    original = EmotionRecognizer.chat

    def spy(self, audio, question, **kwargs):
        texts.append(kwargs["text"])
        return original(self, audio, question, **kwargs)

    monkeypatch.setattr(EmotionRecognizer, "chat", spy)
    assert cli(["chat", "--model", str(model_dir), "--audio", str(a), "--asr", "stub", "--max-new-tokens", "2",
                "how?"]) == 0
    assert "transcript (asr): heard 16000 samples" in capsys.readouterr().err
    assert asr.calls == [[16000]] and texts == [Transcript("heard 16000 samples", "asr")]

    assert cli(["chat", "--model", str(model_dir), "--audio", str(a), "--asr", "stub", "--text", "hello there",
                "--max-new-tokens", "2", "how?"]) == 0
    assert "transcript (gold): hello there" in capsys.readouterr().err
    assert len(asr.calls) == 1 and texts[-1] == Transcript("hello there", "gold")

    # a session: --text belongs to the --audio clip; a clip switched to is transcribed, once for all its questions
    monkeypatch.setattr("sys.stdin", io.StringIO(f"first?\n/audio {b}\nsecond?\nthird?\n/quit\n"))
    assert cli(["chat", "--model", str(model_dir), "--audio", str(a), "--asr", "stub", "--text", "hello there",
                "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "transcript (gold): hello there" in err and "transcript (asr): heard 24000 samples" in err
    assert asr.calls == [[16000], [24000]]
    assert texts[-3:] == [Transcript("hello there", "gold")] + [Transcript("heard 24000 samples", "asr")] * 2

    # no ASR model (no run config, no --asr): the model reads none, and says so
    assert cli(["chat", "--model", str(model_dir), "--audio", str(a), "--max-new-tokens", "2", "how?"]) == 0
    assert "transcript: none" in capsys.readouterr().err and len(asr.calls) == 2
