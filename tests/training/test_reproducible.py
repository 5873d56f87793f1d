"""The same seed on the same machine gives the same model, bit for bit (both stages, dropout on)."""

import pytest
import torch
from safetensors.torch import load_file
from support.corpora import tiny_test_config

from emoq.recipes import load_recipe


@pytest.mark.parametrize("recipe,stage", [("stage1_qformer", "stage1"), ("stage2_llm", "stage2")])
def test_the_same_seed_trains_the_same_weights_twice(corpus, tmp_path, recipe, stage):
    trainer = load_recipe(recipe)
    options = ("trainer.max_steps=4", "trainer.eval_every=2", "model.qformer.hidden_dropout_prob=0.1",
               "model.lora.lora_dropout=0.1", "stage2.init_from=null", "seed=7")
    runs = []
    for name in ("first", "second"):
        state = trainer.setup(tiny_test_config(corpus, tmp_path / name, *options))
        result = trainer.train(state)
        trainer.cleanup(state, result)
        runs.append((result, load_file(tmp_path / name / stage / "final" / "weights" / "model.safetensors")))
    (first, a), (second, b) = runs
    assert first.losses == second.losses and first.history == second.history
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
