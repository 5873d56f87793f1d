"""A streamed `datasets` split: every row reaches exactly one rank per pass, batches group lengths, bad rows are
reported, and a run stopped and resumed equals the uninterrupted run."""

import io

import datasets
import numpy as np
import pytest
import soundfile as sf
from support.corpora import make_tone_corpus_pair, tiny_test_config

from emoq.config import ColumnMap
from emoq.data.meld import read_meld
from emoq.data.streaming import StreamingUtterances
from emoq.training.checkpoint import latest_checkpoint

LABEL2ID = {"neutral": 0, "joy": 1, "anger": 2}


def _wav(seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.ones(int(16000 * seconds))).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def rows_dataset(tmp_path_factory):
    """11 rows of growing length, saved in 2 shards (and 1 shard), with one corrupt clip (row k5)."""
    clips = [{"bytes": _wav(0.2 + 0.05 * i) if i != 5 else b"not audio", "path": f"c{i}.wav"} for i in range(11)]
    table = {"audio": clips, "label": ["joy"] * 11, "key": [f"k{i}" for i in range(11)]}
    dataset = datasets.Dataset.from_dict(table).cast_column("audio", datasets.Audio(decode=False))
    folders = {}
    for shards in (1, 2):
        folders[shards] = tmp_path_factory.mktemp(f"shards{shards}")
        datasets.DatasetDict(train=dataset).save_to_disk(str(folders[shards]), num_shards={"train": shards})
    return folders


def _stream(path, rank=0, world=2, **kw):
    options = {"columns": ColumnMap(text=None), "label_set": "meld7", "label_map": {}, "label2id": LABEL2ID,
               "batch_size": 2, "buffer_size": 4, "seed": 0, "rank": rank, "world_size": world, **kw}
    return StreamingUtterances(str(path), "train", **options)


def _one_pass(stream) -> list[str]:
    keys = []
    for item in stream:
        if stream.state_dict()["pass"] > 0:  # the first item of the next pass
            break
        keys.append(item["key"])
    return keys


@pytest.mark.parametrize("shards", [1, 2])  # 2 shards: one per rank; 1 shard: every other row
def test_two_ranks_see_every_row_exactly_once_per_pass(rows_dataset, shards):
    streams = [_stream(rows_dataset[shards], rank=r) for r in (0, 1)]
    seen = [_one_pass(s) for s in streams]
    assert sorted(seen[0] + seen[1], key=lambda k: int(k[1:])) == [f"k{i}" for i in range(11) if i != 5]
    assert not set(seen[0]) & set(seen[1])
    bad = {key: message for s in streams for key, message in s.skipped.items()}
    assert list(bad) == ["k5"] and "k5 (c5.wav): not a decodable audio file" in bad["k5"]


def test_batches_group_clips_of_similar_length(rows_dataset):
    stream = _stream(rows_dataset[1], world=1, buffer_size=10)
    items = [item for _, item in zip(range(10), stream)]
    lengths = [len(it["audio"]) for it in items]
    pairs = [sorted(lengths[i:i + 2]) for i in range(0, 10, 2)]
    # the buffer's 10 clips (rows 0-10 but the corrupt one) sorted and cut in twos: neighbours share a batch
    everything = sorted(lengths)
    assert sorted(pairs) == [everything[i:i + 2] for i in range(0, 10, 2)]


def test_a_restored_position_continues_exactly_where_it_stopped(rows_dataset):
    stream = _stream(rows_dataset[2], world=1)
    it = iter(stream)
    head = [next(it)["key"] for _ in range(7)]  # mid-buffer, in the second buffer
    state = stream.state_dict()
    rest = [next(it)["key"] for _ in range(15)]  # into the next pass
    again = _stream(rows_dataset[2], world=1)
    again.load_state_dict(state)
    it2 = iter(again)
    assert [next(it2)["key"] for _ in range(15)] == rest
    assert len(set(head)) == 7


@pytest.fixture(scope="module")
def hf_tones(tmp_path_factory):
    return make_tone_corpus_pair(tmp_path_factory.mktemp("tones"), {"train": 6, "dev": 2})


def test_a_streaming_run_stopped_and_resumed_equals_the_uninterrupted_run(hf_tones, tmp_path):
    from emoq.recipes import load_recipe

    root, hf = hf_tones
    trainer = load_recipe("stage1_qformer")
    common = ("data.dataset=hf", f"data.path={hf}", "data.streaming=true", "data.stream_buffer=8",
              "trainer.max_steps=8", "trainer.save_every=3", "trainer.eval_every=100",
              "model.qformer.hidden_dropout_prob=0.1")
    full = trainer.train(trainer.setup(tiny_test_config(root, tmp_path / "full", *common)))
    part = trainer.train(trainer.setup(tiny_test_config(root, tmp_path / "cut", *common)), stop_after=4)
    assert part.step == 4 and latest_checkpoint(tmp_path / "cut" / "stage1").name == "checkpoint-3"
    resumed = trainer.train(trainer.setup(tiny_test_config(root, tmp_path / "cut", *common)))
    assert resumed.step == 8 and len(full.losses) == 8
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_two_processes_stream_every_clip_once_per_pass_and_save_both_positions(hf_tones, tmp_path):
    """A real 2-process DDP run (CPU, gloo) on a 2-shard dataset: one pass per rank is 3 steps of 3 clips; the
    clips the two ranks trained on in those 3 steps are the 18 training clips, each once, and the checkpoint
    holds both ranks' stream positions."""
    import json
    import os
    import subprocess
    import sys

    root, hf = hf_tones
    two_shards = tmp_path / "two_shards"
    datasets.load_from_disk(str(hf)).save_to_disk(str(two_shards), num_shards={"train": 2, "validation": 1})
    recipe = tmp_path / "stage1_recording_keys.py"
    recipe.write_text(
        "import os\n"
        "from emoq.recipes.stage1_qformer import Stage1QFormer\n"
        "class Recording(Stage1QFormer):\n"
        "    def setup(self, cfg):\n"
        "        state = super().setup(cfg)\n"
        "        collate, rank = state.loader.collate_fn, state.accelerator.process_index\n"
        "        def record(items):\n"
        "            with open(os.path.join(cfg.trainer.output_dir, f'keys-{rank}.txt'), 'a') as f:\n"
        "                f.writelines(it['key'] + '\\n' for it in items)\n"
        "            return collate(items)\n"
        "        state.loader.collate_fn = record\n"
        "        return state\n"
        "Recording().main()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"))
    out = tmp_path / "run"
    out.mkdir()
    cmd = [sys.executable, "-m", "emoq.cli", "run", "--config", "emoq/tiny_test", "--nproc", "2", str(recipe),
           f"data.root={root}", "data.dataset=hf", f"data.path={two_shards}", "data.streaming=true",
           "data.stream_buffer=6", "trainer.batch_size=3", "trainer.max_steps=3", "trainer.save_every=3",
           "trainer.eval_every=100", f"trainer.output_dir={out}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [(out / f"keys-{rank}.txt").read_text().split() for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 9 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(u.key for u in read_meld(root, "train"))
    state = json.loads((out / "stage1" / "final" / "trainer_state.json").read_text())
    # each rank: 9 clips yielded = the first buffer of 6 and 3 of the second, in the first pass
    assert [(p["pass"], p["buffer"], p["yielded"]) for p in state["stream_positions"]] == [(0, 1, 3), (0, 1, 3)]
