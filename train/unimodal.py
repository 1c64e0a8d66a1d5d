"""Unimodal baseline: each modality trained alone (its encoder and head), one run per modality.

    accelerate launch train/unimodal.py                         # every modality of the embedded image+tabular set
    accelerate launch train/unimodal.py --modalities [image]    # just one

It is the joint script restricted to one modality (the fused prediction is then that modality's
head), so both baselines share one loop; runs go to <out_dir>/<modality>. What a modality reaches
here is what joint training should at least let it reach.
"""
from __future__ import annotations

from pathlib import Path

from train import checkpoint, data, distributed, joint, loop   # joint imports torch: --help is not instant here
from train.config import ConfigError, declare

CONFIG = declare(joint.CONFIG, out_dir="runs/unimodal_imgtab")   # the joint script's keys
DEFAULT_CONFIG = "train/configs/unimodal_imgtab.yaml"


def main(cfg: dict) -> dict:
    if cfg["aux_weight"]:
        raise ConfigError("aux_weight: has no meaning for unimodal training (set it to 0)")
    modalities = cfg["modalities"]
    if not modalities:  # all of the dataset's (generating a missing embedded set first)
        meta = data.prepare_data(cfg, distributed.setup_accelerator(cfg))
        modalities = list(meta["modalities"])
    results = {}
    for m in modalities:
        out_dir = Path(cfg["out_dir"]) / m
        # --resume continues the modality that was interrupted, skips those finished before it, and
        # starts those not started yet
        if cfg["resume"] and (out_dir / "result.json").is_file():
            print(f"[resume] {m}: finished before ({out_dir / 'result.json'}), skipped", flush=True)
            results[m] = {"run_dir": str(out_dir), "finished_before": True}
            continue
        resume = cfg["resume"] and checkpoint.has_checkpoint(out_dir)
        results[m] = joint.main(cfg | dict(modalities=[m], out_dir=str(out_dir), resume=resume), method="unimodal")
        if "stopped_at_step" in results[m]:   # preempted: stop here, --resume picks up from this modality
            break
    return results


if __name__ == "__main__":
    loop.run_entry_point(main, CONFIG, DEFAULT_CONFIG)
