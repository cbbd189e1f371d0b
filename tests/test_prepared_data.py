"""Prepared data (issue 26): data_pipeline.prepare writes megatron-core indexed shards (resumable after a kill,
the same bytes for any number of workers, one error line for bad input), and `data.source: indexed` reads them
through megatron-core's GPTDataset / BlendedDataset by global sample index (every layout, resume, MLM, blends).
The layouts through the parallel engine: tests/test_parallel.py::test_prepared_data_every_layout_matches_single_process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from common.errors import ProjectError
from conftest import REPO, prepare_config, run_pretrain, tiny_overrides, train_losses
from data_pipeline.config import DataConfig
from data_pipeline.examples import eval_examples, train_examples
from data_pipeline.prepare import main as prepare_main
from data_pipeline.tokenizer import load_or_train_tokenizer
from model.bert.objective import MASKED_LM
from model.opt.objective import CAUSAL_LM


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder (relative names)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def prepare_command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data_pipeline.prepare", "--config", str(config), "--out", str(out),
            "--num-shards", "4", "--max-documents", "400", "--no-progress", *extra]


def test_prepare_killed_and_restarted_with_two_workers_equals_one_uninterrupted(
        prepared_chars: Path, data_cache: Path, tmp_path: Path) -> None:
    """SIGKILL (the whole process group, as a node failure) once a shard is done, then a restart: the same bytes as
    the uninterrupted single-worker preparation, here with two workers."""
    config = prepare_config(tmp_path / "data.yaml", data_cache)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(prepare_command(config, out, "--workers", "2"), cwd=REPO, env=env,
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list(out.glob("*/*/shard-*.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "preparation ended before it could be killed"
    restarted = subprocess.run(prepare_command(config, out, "--workers", "2"), cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "wiki_sample_en/train: 400 documents" in restarted.stdout
    reference = digests(prepared_chars.parent)
    got = digests(out)
    assert set(got) == set(reference) and "wiki_sample_en/train.bin" in got
    assert got == reference


def test_prepare_bad_input_one_error_line_nothing_lost(prepared_chars: Path, data_cache: Path, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    config = prepare_config(tmp_path / "data.yaml", data_cache)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert prepare_main(["--config", str(config), "--out", str(blocker / "out"), "--no-progress"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: output folder") and "is not a folder" in err[0]

    # Another tokenizer than the folder was prepared with: refused, every file as it was.
    out = tmp_path / "prepared"
    shutil.copytree(prepared_chars.parent, out)
    before = digests(out)
    args = ["--config", str(config), "--out", str(out), "--num-shards", "4", "--max-documents", "400",
            "--no-progress", "--set", "data.tokenizer_type=unigram", "--set", "data.vocab_size=512",
            "--set", "data.tokenizer_sample_docs=400"]  # the tokenizer conftest's tiny runs train: cached
    assert prepare_main(args) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]  # not SentencePiece's log
    assert len(err) == 1 and "tokenizer differs from the one" in err[0] and "manifest.json" in err[0], err
    assert digests(out) == before

    # A shard damaged after it was recorded (an interrupted copy, a full disk): the merge names it, keeps it.
    parted = tmp_path / "parted"
    common = ["--config", str(config), "--out", str(parted), "--num-shards", "4", "--max-documents", "400",
              "--no-progress", "--splits", "validation"]
    assert prepare_main(common + ["--task", "0", "--tasks", "1"]) == 0
    shard = parted / "wiki_sample_en" / "validation" / "shard-00000-of-00004.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    capfd.readouterr()
    assert prepare_main(common + ["--merge"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted or damaged shard" in err[0] and str(shard) in err[0], err
    assert shard.stat().st_size == 100 and shard.with_suffix(".json").is_file()


def indexed(path: Path, **extra: object) -> DataConfig:
    return DataConfig(source="indexed", path=str(path), seq_length=32, **extra)  # type: ignore[arg-type]


def test_indexed_samples_by_global_index_every_rank_and_resume(prepared_chars: Path) -> None:
    """Rank r of W reads global samples r, r + W, ... only; the state is the global count and restores into any
    W that divides it; BOS leads every block; validation's union over ranks is the one-rank list."""
    cfg = indexed(prepared_chars, bos=True)
    tokenizer = load_or_train_tokenizer(cfg)
    assert tokenizer.fingerprint == load_or_train_tokenizer(replace(cfg, bos=False)).fingerprint
    single = train_examples(cfg, CAUSAL_LM, tokenizer)
    everything = [next(single) for _ in range(24)]
    assert all(block[0] == tokenizer.bos_id and len(block) == 32 for block in everything)
    assert len({tuple(b.tolist()) for b in everything}) == 24  # shuffled samples, no repeats
    ranks = [train_examples(cfg, CAUSAL_LM, tokenizer, dp_rank=r, dp_world=2) for r in range(2)]
    for n in range(6):
        for r, stream in enumerate(ranks):
            assert torch.equal(next(stream), everything[2 * n + r])
            assert stream.last_block_id == 2 * n + r
    state = ranks[1].state_dict()
    assert state == ranks[0].state_dict() and state["consumed"] == 12
    four = train_examples(cfg, CAUSAL_LM, tokenizer, dp_rank=3, dp_world=4)
    four.load_state_dict(state)
    assert torch.equal(next(four), everything[15])
    with pytest.raises(ProjectError, match="cannot be split over 5"):
        train_examples(cfg, CAUSAL_LM, tokenizer, dp_rank=0, dp_world=5).load_state_dict(state)
    with pytest.raises(ProjectError, match="seed is 1234 in the checkpoint but 7 now"):
        train_examples(replace(cfg, seed=7), CAUSAL_LM, tokenizer).load_state_dict(state)
    # Endless: the stream runs past an epoch (another seed: another order) without a gap.
    per_epoch = single.samples.streams[0].per_epoch
    far = train_examples(cfg, CAUSAL_LM, tokenizer)
    far.load_state_dict({**state, "consumed": per_epoch - 1})
    last, first_of_next = next(far), next(far)
    assert far.epoch == 1 and not torch.equal(last, first_of_next)
    whole = eval_examples(cfg, CAUSAL_LM, tokenizer, max_blocks=10)
    halves = [eval_examples(cfg, CAUSAL_LM, tokenizer, max_blocks=10, dp_rank=r, dp_world=2) for r in range(2)]
    assert len(whole) == 10 and all(torch.equal(a, b) for a, b in zip(whole[0::2], halves[0]))
    assert all(torch.equal(a, b) for a, b in zip(whole[1::2], halves[1]))


def test_indexed_mlm_masks_follow_the_global_sample(prepared_chars: Path) -> None:
    cfg = indexed(prepared_chars)
    tokenizer = load_or_train_tokenizer(cfg)
    one = [next(s) for s in [train_examples(cfg, MASKED_LM, tokenizer)] for _ in range(6)]
    other = train_examples(cfg, MASKED_LM, tokenizer, dp_rank=1, dp_world=3)
    assert torch.equal(next(other), one[1]) and torch.equal(next(other), one[4])
    assert one[0].shape == (2, 32) and one[0][0, 0] == tokenizer.cls_id and one[0][0, -1] == tokenizer.sep_id
    assert not (one[0][0] == tokenizer.eos_id).any()  # documents are separated by [SEP] in MLM examples
    assert sum(int((example[1] != -100).sum()) for example in one) > 0


def test_indexed_blend_follows_weights_and_refuses_mixed_blends(prepared_chars: Path) -> None:
    """megatron-core's BlendedDataset over two prepared sources: shares within 1% of the weights, the same global
    samples for every rank layout; a blend of prepared and streamed sources is refused."""
    sources = [{"name": "a", "source": "indexed", "path": str(prepared_chars), "weight": 1},
               {"name": "b", "source": "indexed", "path": str(prepared_chars), "weight": 3}]
    cfg = DataConfig(sources=sources, seq_length=32, seed=5)
    tokenizer = load_or_train_tokenizer(cfg)
    stream = train_examples(cfg, CAUSAL_LM, tokenizer)
    first = [next(stream) for _ in range(8)]
    counts = torch.bincount(torch.as_tensor(stream.samples._blended(4000).dataset_index[:4000].astype("int64")))
    assert abs(counts[0].item() / 4000 - 0.25) < 0.01
    rank = train_examples(cfg, CAUSAL_LM, tokenizer, dp_rank=1, dp_world=2)
    assert torch.equal(next(rank), first[1]) and torch.equal(next(rank), first[3])
    with pytest.raises(ProjectError, match="weights is"):
        train_examples(replace(cfg, sources=[sources[0], {**sources[1], "weight": 1}]), CAUSAL_LM,
                       tokenizer).load_state_dict(stream.state_dict())
    mixed = [sources[0], {"name": "c", "source": "wiki_sample", "weight": 1}]
    with pytest.raises(ProjectError, match="mixes prepared"):
        DataConfig(sources=mixed).validate()
    with pytest.raises(ProjectError, match="not a prepared data folder"):
        train_examples(indexed(prepared_chars / "train"), CAUSAL_LM, tokenizer)


def test_pretrain_on_prepared_data_resumes_exactly(prepared_chars: Path, data_cache: Path, tmp_path: Path) -> None:
    """launcher.pretrain with data.source=indexed: interrupted at step 3 and resumed == uninterrupted (1e-6)."""
    common = {"data.source": "indexed", "data.path": str(prepared_chars), "eval.outlier_interval": "null"}
    whole = run_pretrain(tiny_overrides(data_cache, tmp_path, **common, **{"logging.run_name": "whole"}), timeout=900)
    assert whole.returncode == 0, whole.stderr[-3000:]
    parted = tiny_overrides(data_cache, tmp_path, **common, **{"logging.run_name": "parted"})
    first = run_pretrain(parted + ["train.exit_interval=3"], timeout=900)
    assert first.returncode == 0 and "exit_interval reached" in first.stdout + first.stderr, first.stderr[-3000:]
    second = run_pretrain(parted, resume="auto", timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    expected, got = train_losses(tmp_path / "whole"), train_losses(tmp_path / "parted")
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    assert all(abs(got[s] - expected[s]) <= 1e-6 for s in expected), (got, expected)


def test_prefetcher_resumes_at_the_next_example_taken(data_cache: Path) -> None:
    """The thread reads ahead; the state is still the consumer's position: a fresh stream restored from it
    continues with exactly the example the prefetching one hands out next (also for BERT's MLM examples)."""
    from data_pipeline.prefetch import Prefetcher

    cfg = DataConfig(source="wiki_sample", tokenizer_type="char", seq_length=32, cache_dir=str(data_cache),
                     shard_by="documents")
    tokenizer = load_or_train_tokenizer(cfg)
    for objective in (CAUSAL_LM, MASKED_LM):
        ahead = Prefetcher(train_examples(cfg, objective, tokenizer, dp_rank=1, dp_world=2), depth=8)
        taken = [next(ahead) for _ in range(5)]
        time.sleep(0.2)  # let it read ahead
        state = ahead.state_dict()
        fresh = train_examples(cfg, objective, tokenizer, dp_rank=1, dp_world=2)
        assert all(torch.equal(a, next(fresh)) for a in taken)
        restored = train_examples(cfg, objective, tokenizer, dp_rank=1, dp_world=2)
        restored.load_state_dict(state)
        following = next(ahead)
        assert torch.equal(following, next(restored))
        ahead.load_state_dict(state)  # rewinds what it had read ahead
        assert torch.equal(next(ahead), following)
        ahead.close()


def test_plan_says_when_data_bounds_the_step() -> None:
    """launcher.plan's data line for opt_125m on 64 H100s: streaming with blocks sharding (every rank tokenizes all
    ranks' data) bounds the step, documents sharding (the default, auto, with several ranks) and prepared data do
    not."""
    from launcher.config import load_config
    from launcher.planner import data_line, device_named, layout_of, plan_layout

    def line(*overrides: str) -> str:
        cfg = load_config(REPO / "configs/opt_125m.yaml", ["train.micro_batch_size=3", *overrides])
        text = data_line(cfg, plan_layout(cfg, layout_of(cfg, 64), device_named("H100")))
        assert text is not None and text.startswith("data: each data-parallel rank consumes ")
        return text

    streamed = ("data.sources=[]", "data.source=wiki_sample")
    blocks = line(*streamed, "data.shard_by=blocks")
    assert "DATA-BOUND" in blocks and "prepare the data" in blocks
    assert line(*streamed, "data.shard_by=documents").endswith("keeps up") and line(*streamed).endswith("keeps up")
    assert line().endswith("data does not bound the step")  # the recipe reads prepared shards


def test_validation_and_calibration_read_the_prepared_validation_split(data_cache: Path, tmp_path: Path) -> None:
    """A prepared folder whose train split is written with the letters a-m only and its validation split with n-z:
    training reads a-m, while the validation examples and the outlier / W8A8 evaluation's calibration examples
    (the family spec's, what outliers.report and launcher.evaluate use) are validation text, for OPT and BERT."""
    import json
    import random

    from data_pipeline.prepare import prepare
    from launcher.config import config_from_dict
    from model.family import family_of

    rng = random.Random(0)

    def documents(path: Path, letters: str) -> str:
        words = lambda: " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 8)))  # noqa: E731
                                 for _ in range(rng.randint(20, 40)))
        path.write_text("".join(json.dumps({"text": words()}) + "\n" for _ in range(60)))
        return str(path)

    config = prepare_config(tmp_path / "data.yaml", data_cache, source="files",
                            train_files=[documents(tmp_path / "train.jsonl", "abcdefghijklm")],
                            validation_files=[documents(tmp_path / "validation.jsonl", "nopqrstuvwxyz")])
    prepare(str(config), tmp_path / "out", num_shards=1, progress=False)

    def letters(examples: list[torch.Tensor], tokenizer) -> set[str]:
        seen: set[str] = set()
        for example in examples:
            ids = example if example.dim() == 1 else torch.where(example[1] != -100, example[1], example[0])
            seen |= set(tokenizer.decode(ids.tolist()))  # the character vocabulary decodes special ids to ""
        return seen - {" ", "\n"}

    model = {"num_layers": 1, "hidden_size": 32, "num_heads": 4, "ffn_hidden_size": 64, "max_position_embeddings": 32,
             "vocab_size": 128}
    for family in ("opt", "bert"):
        cfg = config_from_dict({"model": {"family": family, **model}, "eval": {"max_blocks": 8},
                                "data": {"source": "indexed", "path": str(tmp_path / "out" / "files"), "seq_length": 32,
                                         "cache_dir": str(data_cache)}})
        spec = family_of(cfg.model)
        tokenizer = spec.tokenizer(cfg)
        train = spec.data(cfg).train
        assert letters([next(train) for _ in range(8)], tokenizer) <= set("abcdefghijklm"), family
        for examples in (spec.calibration_examples(cfg, 8), spec.validation_examples(cfg)):
            assert len(examples) == 8 and set() < letters(examples, tokenizer) <= set("nopqrstuvwxyz"), family
