"""Checkpoints: everything that writes, verifies, selects and reads them, below the launcher.

    store.py        crash-safe DeepSpeed checkpoints: per-rank component states, sha256 manifest, `latest`,
                    pruning, verification, the newest intact checkpoint
    resume.py       where a run continues from (`--resume`) and which config changes a checkpoint takes
    runlock.py      one writer per run directory (flock)
    consolidate.py  any layout's shards -> the full state dict (the parameter manifest; DeepSpeed file names)
    weights.py      any checkpoint kind -> the full state dict; the weights-only format (model.safetensors)

Components save and restore their own state (`state_dict` / `load_state_dict`: the data stream, the
parallel model); the writer stores {name: component.state_dict()} per rank. This package imports only
common/ and torch/DeepSpeed: the launcher passes in what needs the run config (its text, its defaults).
"""
