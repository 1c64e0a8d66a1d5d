"""The run directory: checked before anything is written, the resolved config, TensorBoard,
metrics.jsonl, result.json and the closing table."""
from __future__ import annotations

import json
from pathlib import Path

from train.checkpoint import atomic_write_text, checkpoint_step, write_run_config
from train.config import ConfigError


#: What a run writes into its out_dir. A fresh run refuses a directory holding any of them (the
#: launchers' own files, slurm_jobs.log, submit.txt, submitit/, do not count).
RUN_FILES = ("checkpoints", "config.yaml", "metrics.jsonl", "best.pt", "result.json", "tb")


def previous_run_files(run_dir: Path) -> list[str]:
    """The names in RUN_FILES that exist under `run_dir`: what a fresh run there would overwrite."""
    return [name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def setup_run_dir(cfg: dict, accelerator):
    """Check the run directory, then create it, write the resolved config and open TensorBoard.

    Every rank checks before any rank writes (the directory is on a shared file system), so all
    refuse together. A fresh run refuses a directory that holds any file of a previous run
    (RUN_FILES): nothing already written is lost; --resume needs checkpoints/latest. A resumed run
    leaves config.yaml alone here: resume_from_checkpoint rewrites it once the checkpoint has been
    accepted, so a rejected --resume changes nothing. TensorBoard events logged after the
    checkpoint (by the run that was stopped) are purged: they are logged again.
    """
    run_dir = Path(cfg["out_dir"])
    latest = run_dir / "checkpoints" / "latest"
    if cfg["resume"]:
        if not latest.exists():
            raise ConfigError(f"--resume: no checkpoint under {run_dir / 'checkpoints'} "
                              "(drop --resume to start a run there)")
        purge_step = checkpoint_step(latest) + 1
    else:
        previous = previous_run_files(run_dir)
        if previous:
            what = ("pass --resume to continue that run, or choose another --out_dir" if latest.exists() else
                    "it has no checkpoint to resume from; choose another --out_dir, or delete those files")
            raise ConfigError(f"out_dir={run_dir} holds a previous run's files ({', '.join(previous)}): {what}")
    accelerator.wait_for_everyone()
    writer = None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg["resume"]:
            write_run_config(run_dir, cfg)
        writer = TensorBoardLog(run_dir / "tb", purge_step=purge_step if cfg["resume"] else None)
    accelerator.wait_for_everyone()
    return run_dir, writer


class TensorBoardLog:
    """TensorBoard's SummaryWriter, opened at the first scalar: a run refused before it logs
    anything (a --resume whose checkpoint does not fit) leaves tb/ exactly as it was."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        self.log_dir, self.purge_step, self._writer = Path(log_dir), purge_step, None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
        self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def log_scalars(writer, scalars: dict, step: int) -> None:
    if writer is not None:
        for key, value in scalars.items():
            writer.add_scalar(key, float(value), step)


def append_jsonl(run_dir: Path, record: dict, accelerator) -> None:
    if accelerator.is_main_process:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def write_result(run_dir: Path, result: dict) -> None:
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2))


def print_table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    text = "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
    print(text, flush=True)
    return text


def print_result_table(result: dict, select_key: str = "acc") -> str:
    """The closing table: per-modality and fused test/val metric beside each Bayes limit."""
    bayes = dict(result.get("bayes_accuracy") or {})
    trained = [m for m in result["test"] if m != "fused"]
    # the fused limit is "all" only when every modality was used; one modality alone is its own limit
    bayes["fused"] = (bayes.get("all") if set(trained) == set(bayes) - {"all"} else
                      bayes.get(trained[0]) if len(trained) == 1 else None)
    rows = []
    for name, test in result["test"].items():
        limit = bayes.get(name)
        rows.append([name, f"{test[select_key]:.4f}", f"{result['val'][name][select_key]:.4f}",
                     "-" if limit is None else f"{limit:.4f}",
                     "-" if limit is None or select_key != "acc" else f"{limit - test[select_key]:+.4f}"])
    print(f"\nrun directory: {result['run_dir']}   (best epoch {result['best_epoch']} on validation)")
    text = print_table(rows, ["modality", f"test {select_key}", f"val {select_key}", "Bayes limit", "gap to limit"])
    print(f"TensorBoard: tensorboard --logdir {result['run_dir']}/tb\n", flush=True)
    return text
