"""EmotionRecognizer: batch invariance of classification, streamed chat. (`emoq eval`: tests/test_eval.py)"""

import numpy as np

from emoq.inference import EmotionRecognizer


def test_classify_batch_of_16_equals_one_by_one(saved_model):
    rec = EmotionRecognizer.from_pretrained(saved_model, device="cpu")
    rng = np.random.default_rng(1)
    clips = [(rng.standard_normal(int(16000 * rng.uniform(0.5, 2.0))) * 0.1).astype(np.float32) for _ in range(16)]
    batched = rec.classify_batch(clips, batch_size=16)
    for clip, res in zip(clips, batched):
        one = rec.classify((clip, 16000))
        assert one["label"] == res["label"]
        np.testing.assert_allclose(list(one["log_likelihoods"].values()), list(res["log_likelihoods"].values()),
                                   rtol=1e-5, atol=1e-4)
    assert abs(sum(batched[0]["scores"].values()) - 1) < 1e-5


def test_chat_streams_the_same_text_as_non_streaming(saved_model):
    rec = EmotionRecognizer.from_pretrained(saved_model, device="cpu")
    clip = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
    full = rec.chat((clip, 16000), "How does the speaker feel?", max_new_tokens=6)
    streamed = "".join(rec.chat((clip, 16000), "How does the speaker feel?", stream=True, max_new_tokens=6))
    assert streamed.strip() == full
