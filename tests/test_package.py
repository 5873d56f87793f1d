"""`import emoq` is cheap, and once it has run the transformers Auto classes load emoq's saved models and
processors (in a fresh interpreter, so nothing else has registered them)."""

import json
import subprocess
import sys
import textwrap

import torch
from support.environment import tail

from emoq.models.tiny import build_tiny

LABELS = ["neutral", "joy", "anger"]


def test_after_import_emoq_auto_classes_load_a_saved_model_and_processor(tmp_path, clips):
    model, processor = build_tiny(LABELS, lora={"r": 4}, seed=5)
    model.eval().save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    torch.save(clips, tmp_path / "clips.pt")
    script = textwrap.dedent(f"""
        import json, sys
        import emoq
        cheap = not any(name in sys.modules for name in ("torch", "transformers", "emoq.models"))
        import torch
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(tmp_path / "m")!r}).eval()
        processor = AutoProcessor.from_pretrained({str(tmp_path / "m")!r})
        batch = processor(torch.load({str(tmp_path / "clips.pt")!r}, weights_only=False))
        with torch.no_grad():
            scores = model.score_labels(batch["input_ids"], batch["attention_mask"], batch["input_features"],
                                        processor.label_candidates(), batch["feature_attention_mask"])
        print(json.dumps({{"cheap": cheap, "model": type(model).__name__, "processor": type(processor).__name__,
                          "labels": processor.labels, "scores": scores.tolist()}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, tail(proc.stderr)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cheap"], "import emoq should not import torch, transformers or the models"
    assert (got["model"], got["processor"], got["labels"]) == ("EmoQForConditionalGeneration", "EmoQProcessor", LABELS)
    batch = processor(clips)
    with torch.no_grad():
        expected = model.score_labels(batch["input_ids"], batch["attention_mask"], batch["input_features"],
                                      processor.label_candidates(), batch["feature_attention_mask"])
    torch.testing.assert_close(torch.tensor(got["scores"]), expected, atol=1e-5, rtol=1e-5)
