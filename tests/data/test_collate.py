"""EmoQCollator: right padding + answer-only labels for training, left padding for generation,
masks that match the true lengths, and bs=1 == the un-padded slice of a batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emoq.data.collate import EmoQCollator
from emoq.models import PLACEHOLDER_TOKEN

SECONDS = (1.0, 0.37, 2.21)  # different clip lengths
TEXTS = ("the weather report said it would rain tomorrow. I will take the train at noon.", "hi", None)
LABELS = ("joy", "anger", "neutral")


def _items(n=3):
    rng = np.random.default_rng(0)
    return [
        {"key": f"k{i}", "audio": (rng.standard_normal(int(16000 * SECONDS[i])) * 0.1).astype(np.float32),
         "text": TEXTS[i], "label": LABELS[i], "label_id": i}
        for i in range(n)
    ]


def _expected_ids(processor, item, with_answer):
    """Prompt (+ answer) ids built straight from the tokenizer's chat template."""
    tok = processor.tokenizer
    lines = [PLACEHOLDER_TOKEN] + ([f"Transcript: {item['text']}"] if item["text"] else []) + [processor.default_question()]
    msgs = [{"role": "system", "content": processor.system_prompt}, {"role": "user", "content": "\n".join(lines)}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    prompt = prompt.replace(PLACEHOLDER_TOKEN, PLACEHOLDER_TOKEN * processor.num_query_tokens)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(f"{item['label']}<|im_end|>\n", add_special_tokens=False)["input_ids"] if with_answer else []
    return prompt_ids, answer_ids


@pytest.fixture
def processor(tiny):
    return tiny(labels=["neutral", "joy", "anger"])[1]


def test_training_batch_is_right_padded_with_answer_only_labels(processor):
    items = _items()
    batch = EmoQCollator(processor, with_answers=True)(items)
    pad = processor.tokenizer.pad_token_id
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape
    lengths = []
    for i, item in enumerate(items):
        prompt, answer = _expected_ids(processor, item, with_answer=True)
        n = len(prompt) + len(answer)
        lengths.append(n)
        assert int(mask[i].sum()) == n
        assert mask[i, :n].all() and not mask[i, n:].any()  # right padding
        assert ids[i, :n].tolist() == prompt + answer
        assert (ids[i, n:] == pad).all()
        assert (ids[i] == processor.audio_token_id).sum() == processor.num_query_tokens
        # only the answer (label word + end of turn) is labelled; prompt and padding are -100
        assert (labels[i, : len(prompt)] == -100).all() and (labels[i, n:] == -100).all()
        assert labels[i, len(prompt) : n].tolist() == answer == ids[i, len(prompt) : n].tolist()
        assert processor.tokenizer.decode(answer) == f"{item['label']}<|im_end|>\n"
    assert len(set(lengths)) == 3 and ids.shape[1] == max(lengths)  # the texts really differ in length
    assert batch["emotion_labels"].tolist() == [0, 1, 2] and batch["keys"] == ["k0", "k1", "k2"]


def test_generation_batch_is_left_padded_without_labels(processor):
    items = _items()
    batch = EmoQCollator(processor, padding_side="left")(items)
    assert "labels" not in batch
    ids, mask = batch["input_ids"], batch["attention_mask"]
    width = ids.shape[1]
    for i, item in enumerate(items):
        prompt, _ = _expected_ids(processor, item, with_answer=False)
        start = width - len(prompt)
        assert int(mask[i].sum()) == len(prompt)
        assert not mask[i, :start].any() and mask[i, start:].all()  # ones at the end
        assert (ids[i, :start] == processor.tokenizer.pad_token_id).all()
        assert ids[i, start:].tolist() == prompt
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).sum() == 2  # every prompt ends at the last column


@pytest.mark.parametrize("encoder, per_second", [("whisper", 100), ("hubert", 16000)])
def test_feature_mask_matches_each_clip(tiny, encoder, per_second):
    processor = tiny(encoder=encoder)[1]
    items = _items()
    batch = EmoQCollator(processor, with_answers=True)(items)
    frames = [len(it["audio"]) * per_second // 16000 for it in items]  # log-mel hop 160 / raw samples
    assert batch["feature_attention_mask"].sum(1).tolist() == frames
    assert batch["input_features"].shape[-1] == max(frames)
    for i, n in enumerate(frames):
        assert batch["feature_attention_mask"][i, :n].all() and not batch["feature_attention_mask"][i, n:].any()
        assert (batch["input_features"][i, ..., n:] == 0).all()
    # transcripts for the EmoQ-Former: right padded, mask = token count (0 for the clip without text)
    tok = processor.tokenizer
    counts = [len(tok(t, add_special_tokens=False)["input_ids"][: processor.max_transcript_tokens]) if t else 0
              for t in TEXTS]
    assert batch["transcript_attention_mask"].sum(1).tolist() == counts and counts[1] > 0


@pytest.mark.parametrize("mode", [dict(with_answers=True), dict(padding_side="left"), dict(with_prompt=False)])
def test_single_item_batches_equal_unpadded_slices(processor, mode):
    items = _items()
    collate = EmoQCollator(processor, **mode)
    batch = collate(items)
    for i, item in enumerate(items):
        one = collate([item])
        n_feat = int(batch["feature_attention_mask"][i].sum())
        assert torch.equal(one["input_features"][0], batch["input_features"][i, ..., :n_feat])
        assert one["feature_attention_mask"].sum() == n_feat
        if item["text"]:
            t = batch["transcript_attention_mask"][i].bool()
            assert torch.equal(one["transcript_ids"][0], batch["transcript_ids"][i][t])
        else:
            assert "transcript_ids" not in one
        if mode.get("with_prompt", True):
            m = batch["attention_mask"][i].bool()
            assert one["attention_mask"].all() and one["attention_mask"].shape[1] == int(m.sum())
            assert torch.equal(one["input_ids"][0], batch["input_ids"][i][m])
            if "labels" in batch:
                assert torch.equal(one["labels"][0], batch["labels"][i][m])
        else:
            assert "input_ids" not in batch and "input_ids" not in one
        assert one["emotion_labels"].tolist() == [i]


def test_cached_frames_are_padded_with_matching_mask(processor):
    frames = [torch.randn(n, 8) for n in (5, 2, 9)]
    items = [{"key": f"k{i}", "frames": f, "text": TEXTS[i], "label": LABELS[i], "label_id": i}
             for i, f in enumerate(frames)]
    batch = EmoQCollator(processor, with_prompt=False)(items)
    assert batch["encoder_frames"].shape == (3, 9, 8)
    assert batch["encoder_frame_mask"].sum(1).tolist() == [5, 2, 9]
    for i, f in enumerate(frames):
        assert torch.equal(batch["encoder_frames"][i, : len(f)], f) and (batch["encoder_frames"][i, len(f):] == 0).all()
    with pytest.raises(ValueError, match="stage 1"):
        EmoQCollator(processor)(items)


def test_rationale_answers_and_the_label_candidates_that_score_them(processor, tmp_path):
    """data.rationale: the answer trained on is "label\\nrationale<eot>" (when the row has a rationale); label
    scoring then scores "label\\n", which is exactly how every such answer starts, token for token."""
    processor.rationale_separator = "\n"
    items = _items()
    items[0]["rationale"] = "The voice is calm and even."
    batch = EmoQCollator(processor, with_answers=True)(items)
    candidates = processor.label_candidates()
    for i, item in enumerate(items):
        answer = [t for t in batch["labels"][i].tolist() if t != -100]
        text = processor.tokenizer.decode(answer)
        if i == 0:
            head = candidates[processor.labels.index(item["label"])]
            assert text == f"{item['label']}\nThe voice is calm and even.<|im_end|>\n"
            assert answer[: len(head)] == head  # the candidate is the answer's head
            assert processor.tokenizer.decode(head) == f"{item['label']}\n"
        else:  # no rationale on this row: the plain label answer
            assert text == f"{item['label']}<|im_end|>\n"
    processor.save_pretrained(tmp_path)
    assert type(processor).from_pretrained(tmp_path).rationale_separator == "\n"
