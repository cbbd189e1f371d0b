"""Pretrain a model of any family: `python -m launcher.pretrain --config configs/opt_tiny.yaml [--set k=v ...]`.

Also runs unchanged under `deepspeed --num_gpus N launcher/pretrain.py ...` and `torchrun` (data
parallel with ZeRO stage `parallel.zero_stage`). This module checks the input before any process group
starts (`prepare`) and turns failures into one line; the loop is launcher/trainer.py.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports below: an early SIGUSR1/SIGTERM is recorded, not fatal
    from launcher.signals import GracefulStop

    GracefulStop.install()

import argparse
import contextlib
import logging
import sys
import traceback
from typing import Any

import torch

from checkpoint.resume import check_resume_config, resume_point
from checkpoint.runlock import RunLock
from checkpoint.store import last_checkpoint_note
from common.errors import ProjectError
from data_pipeline.cache_rollback import remove_new_cache_files_on_error
from launcher.config import RunConfig, load_config
from launcher.distributed import WorldInfo, close_process_group, world_from_env
from launcher.hf_checkpoint import init_state
from launcher.nonfinite import RunFailure
from launcher.periodic import user_components
from launcher.preflight import preflight
from launcher.quiet import quiet_library_noise
from launcher.signals import GracefulStop
from launcher.trainer import Prepared, Trainer, build_optimizer, deepspeed_config  # noqa: F401 (their old home)
from model.family import family_of
from outliers.periodic import check_config as check_outlier_config
from parallel.layout import validate_layout
from common.cli import ArgumentParser, run_command

log = logging.getLogger("launcher.pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/opt_tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--resume", default="none",
                        help="'auto': continue from the run's latest checkpoint if there is one; "
                             "a checkpoint path; or 'none' (default)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def prepare(cfg: RunConfig, world: WorldInfo, resume: str) -> Prepared:
    """Validate everything that depends on files or the world size; raises ProjectError on bad input."""
    preflight(cfg)
    layout = validate_layout(cfg.model, tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline,
                             zero_stage=cfg.parallel.zero_stage, world_size=world.world_size,
                             micro_batch_size=cfg.train.micro_batch_size, global_batch_size=cfg.train.global_batch_size)
    # megatron-core / DeepSpeed rank order: tensor innermost, then data, pipeline outermost.
    dp_rank = (world.rank // layout.tensor) % layout.data
    check_outlier_config(cfg)
    resume_from, note = resume_point(cfg.run_path, resume, world.world_size)
    if note and world.is_main:  # e.g. the newest checkpoint is damaged and an older one is used
        print(f"note: {note}", file=sys.stderr, flush=True)
    defaults = RunConfig().to_dict()  # what a key the saved config lacks meant when it was written
    changed = check_resume_config(resume_from, cfg.to_dict(), defaults) if resume_from is not None else {}
    initial_state = init_state(cfg.train.init_from, cfg) if cfg.train.init_from and resume_from is None else None
    spec = family_of(cfg.model)
    # A bad data file leaves no cache behind (text families cache tokenizers and corpora under data.cache_dir).
    cache_dir = getattr(cfg.data, "cache_dir", None)
    with remove_new_cache_files_on_error(cache_dir) if cache_dir else contextlib.nullcontext():
        data = spec.data(cfg, dp_rank=dp_rank, dp_world=layout.data)
    grad_accumulation = cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.data)
    return Prepared(cfg, world, spec, data, grad_accumulation, resume_from, changed, layout, initial_state,
                    periodic=user_components(cfg))


def train(prep: Prepared) -> dict[str, Any]:
    """Train the prepared run (launcher/trainer.py) to its last step or a stop; returns its summary."""
    return Trainer(prep).fit()


def failure_line(error: Exception, cfg: RunConfig | None) -> str:
    """One line for an exception nobody turned into a user-facing error; the traceback goes to crash.log."""
    note = last_checkpoint_note(cfg.run_path / "checkpoints") if cfg is not None else "nothing was written"
    if isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error):
        return (f"out of memory with train.micro_batch_size={cfg.train.micro_batch_size} and data.seq_length="
                f"{cfg.data.seq_length}: lower train.micro_batch_size (gradient accumulation keeps "
                f"train.global_batch_size={cfg.train.global_batch_size}), or spread the model over more devices "
                f"(parallel.tensor, parallel.pipeline with parallel.activation_checkpointing, parallel.zero_stage); "
                f"{note}") if cfg is not None else f"out of memory: {error}"
    where = ""
    if cfg is not None and cfg.run_path.is_dir():
        (cfg.run_path / "crash.log").write_text(traceback.format_exc())
        where = f" (traceback in {cfg.run_path / 'crash.log'})"
    return f"training failed: {type(error).__name__}: {' '.join(str(error).split())[:300]}{where}; {note}"


def main(argv: list[str] | None = None) -> int:
    # Called as a function (tests, submitit), the stop handler lasts for the call; a signal received meanwhile
    # goes on to the previous handler afterwards (submitit's requeue). As a program it was installed above.
    with GracefulStop.installed():
        return run_command("launcher.pretrain", _main, argv)  # common/cli.py: bad flags, library log lines


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_library_noise()
    args = parse_args(argv)
    try:
        world = world_from_env()
        cfg = load_config(args.config, args.overrides)
        prep = prepare(cfg, world, args.resume)
        train(prep)
    except ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunFailure as failure:  # summary.json is written; every checkpoint on disk is intact
        if world.is_main or not failure.agreed:
            print(f"error: {failure}; {last_checkpoint_note(cfg.run_path / 'checkpoints')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: say where things stand instead of a traceback
        where = last_checkpoint_note(cfg.run_path / "checkpoints") if "cfg" in locals() else "nothing was written"
        print(f"error: interrupted (Ctrl-C); {where}", file=sys.stderr)
        return 130
    except Exception as error:  # an out-of-memory or a bug: one line here, the traceback in the run directory
        print(f"error: {failure_line(error, cfg if 'cfg' in locals() else None)}", file=sys.stderr)
        return 1
    finally:
        RunLock.release_all()  # a run that raised still holds it; the next in-process run must not be refused
        close_process_group()  # not left to exit-time destructors, which can abort a finished rank (exit 134)
    return 0


if __name__ == "__main__":
    sys.exit(main())
