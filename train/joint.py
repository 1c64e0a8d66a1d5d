"""Joint training baseline: late fusion (per-modality heads, logits summed), one loss on the fused
prediction, optionally plus the sum of the per-modality losses (`aux_weight`).

    accelerate launch train/joint.py                                  # embedded image+tabular benchmark
    accelerate launch train/joint.py --config train/configs/joint_av.yaml --epochs 5
    accelerate launch --multi_gpu --num_processes 2 train/joint.py    # 2-rank DDP (gloo on CPU)
    accelerate launch --config_file train/configs/accelerate/deepspeed_zero2.yaml --num_processes 8 \
        train/joint.py --mixed_precision bf16                         # DeepSpeed ZeRO-2 (or zero1)

Each head alone is that modality's classifier, so the per-modality accuracies read off a jointly
trained model show modality laziness: the weak modality stays far below what it can reach alone.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.fusion import LateFusionModel  # noqa: E402
from train import common  # noqa: E402

# ------------------------------------------------------------------------------------------------
# config: every key can be set in the YAML or on the command line (--key value, --a.b value)
DEFAULTS = dict(
    data="data/embedded_imgtab",   # a shard directory; a missing embedded_<flavour> is generated
    data_seed=0,                   # seed of the embedded generator
    modalities=[],                 # train on these modalities only ([] = all of the dataset's)
    encoders={},                   # per-modality encoder config, see models.encoders.build_encoder
    out_dir="runs/joint_imgtab",
    seed=0,
    resume=False,                  # continue the run in out_dir from its latest checkpoint
    epochs=15,
    batch_size=128,                # global batch (split across ranks)
    eval_batch_size=500,
    num_workers=0,
    optimizer="adam",              # adam | adamw | sgd
    lr=1e-3,
    weight_decay=1e-4,
    momentum=0.9,                  # sgd only
    scheduler="none",              # none | step | cosine (stepped once per epoch)
    step_size=10,
    gamma=0.1,
    aux_weight=0.0,                # + aux_weight * sum_m loss(head_m(f_m), y)
    select_on="fused",             # best model by validation: fused | modality_mean (common.selection_score)
    select_metric="acc",           # ... classification: acc | macro_f1 (regression always selects on MAE)
    grad_clip=0.0,                 # clip the global gradient norm (0 = off)
    mixed_precision="no",          # no | bf16 | fp16
    cpu=False,                     # force CPU even where CUDA exists
    log_every=25,                  # steps between TensorBoard scalars (and the NaN check)
    eval_every=1,                  # epochs between validations
    ckpt_every_steps=0,            # also checkpoint every N steps inside an epoch (0 = per epoch only)
    keep_checkpoints=2,
    preempt_check_every=1,         # steps between checks for SIGTERM/SIGUSR1 across ranks
    stop_after_steps=0,            # checkpoint and exit at this step, as a preempted job would (0 = off)
    progress=True,                 # tqdm bar on rank 0
)
DEFAULT_CONFIG = "train/configs/joint_imgtab.yaml"


def main(cfg: dict) -> dict:
    common.check_choice("select_on", cfg["select_on"], common.SELECT_ON)   # before any compute
    common.check_choice("select_metric", cfg["select_metric"], common.SELECT_METRIC)
    accelerator = common.setup_accelerator(cfg)
    preemption = common.Preemption(accelerator, cfg["preempt_check_every"])   # SIGTERM/SIGUSR1 -> checkpoint, exit
    meta = common.prepare_data(cfg, accelerator)            # validates every shard before any compute
    modalities = cfg["modalities"] or list(meta["modalities"])
    unknown = [m for m in modalities if m not in meta["modalities"]]
    if unknown:
        raise common.ConfigError(f"modalities: {unknown} not in {cfg['data']} (it has {', '.join(meta['modalities'])})")
    task = meta["task"]
    if task not in ("classification", "regression"):
        raise common.ConfigError(f"{cfg['data']}: task '{task}' is not supported by the joint baseline")
    if task != "classification" and cfg["select_metric"] != "acc":
        raise common.ConfigError(f"select_metric='{cfg['select_metric']}': {task} selects on MAE")
    select_key = cfg["select_metric"] if task == "classification" else "mae"
    better = (lambda a, b: a > b) if task == "classification" else (lambda a, b: a < b)
    run_dir, writer = common.setup_run_dir(cfg, accelerator)

    # data ----------------------------------------------------------------------------------------
    train_loader, train_sampler = common.make_loader(cfg, meta, "train", accelerator, modalities, train=True)
    val_loader, _ = common.make_loader(cfg, meta, "val", accelerator, modalities)
    test_loader, _ = common.make_loader(cfg, meta, "test", accelerator, modalities)
    steps_per_epoch = len(train_sampler)
    if steps_per_epoch == 0:
        raise common.ConfigError(f"batch_size={cfg['batch_size']} exceeds the {meta['splits']['train']['num_samples']} "
                                 f"training samples of {cfg['data']} (the last partial batch is dropped)")

    # model, optimiser ------------------------------------------------------------------------------
    model = LateFusionModel(meta, cfg["encoders"], modalities)
    optimizer = common.build_optimizer(cfg, model.parameters())
    scheduler = common.build_scheduler(cfg, optimizer)
    zero_stage = common.configure_deepspeed(accelerator, cfg, model)   # None without DeepSpeed
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    # DeepSpeed: backward and step on the engine itself (accelerator.backward would step inside it,
    # before the logging below reads the gradients); DeepSpeed clips inside its step (its
    # gradient_clipping, set from grad_clip by configure_deepspeed)
    engine = model if zero_stage is not None else None

    state = dict(epoch=0, batch_in_epoch=0, step=0, best=None, best_epoch=-1)
    checkpointed = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    if cfg["resume"]:
        state = common.load_checkpoint(run_dir, accelerator, checkpointed, cfg=cfg)
        accelerator.print(f"[resume] from step {state['step']} (epoch {state['epoch']}, batch {state['batch_in_epoch']})")

    # loop ----------------------------------------------------------------------------------------
    nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    model.train()
    while state["epoch"] < cfg["epochs"]:
        train_sampler.set_epoch(state["epoch"], start_batch=state["batch_in_epoch"])
        bar = tqdm(train_loader, total=len(train_sampler), desc=f"epoch {state['epoch']}", leave=False,
                   disable=not (cfg["progress"] and accelerator.is_main_process))
        for batch in bar:
            batch = common.to_device(batch, accelerator.device)
            labels = batch["label"]
            with accelerator.autocast():
                out = model(batch)
                fused = LateFusionModel.fuse(out)
                loss = common.task_loss(task, fused, labels)
                if cfg["aux_weight"]:
                    loss = loss + cfg["aux_weight"] * sum(common.task_loss(task, lg, labels) for _, lg in out.values())
            optimizer.zero_grad(set_to_none=True)
            if engine is None:
                accelerator.backward(loss)
            else:
                engine.backward(loss)
            nonfinite |= ~torch.isfinite(loss.detach())
            if cfg["grad_clip"] > 0 and engine is None:
                accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"])

            if (state["step"] + 1) % cfg["log_every"] == 0:
                common.check_finite(nonfinite, state["step"] + 1, cfg["log_every"], accelerator)
                scalars = {"train/loss": loss.detach()}
                if engine is None:
                    fused_head_grads = {m: common.flat_grad(raw.heads[m].parameters()) for m in out}
                else:
                    # ZeRO-1/2: p.grad is None after engine.backward; the diagnostics are computed (not
                    # skipped) from the full reduced gradients, deepspeed.utils.safe_get_full_grad
                    # (collectives, same order on every rank). DeepSpeed clips later, inside
                    # engine.step: scale as clip_grad_norm_ does above, so that the logged values are
                    # the clipped ones, as without DeepSpeed (encoders + heads = every parameter).
                    fused_head_grads = {m: common.deepspeed_full_grads(raw.heads[m].parameters()) for m in out}
                    encoder_norms = {m: common.deepspeed_grad_norm(raw.encoders[m].parameters()) for m in out}
                    if cfg["grad_clip"] > 0:
                        total = torch.linalg.vector_norm(torch.stack(
                            [*encoder_norms.values(), *map(torch.linalg.vector_norm, fused_head_grads.values())]))
                        coef = torch.clamp(cfg["grad_clip"] / (total + 1e-6), max=1.0)
                        fused_head_grads = {m: g * coef for m, g in fused_head_grads.items()}
                        encoder_norms = {m: n * coef for m, n in encoder_norms.items()}
                for m, (features, logits) in out.items():
                    # this modality's own loss through its head alone, vs what the fused loss sends it
                    head_input = features.detach().float()
                    if engine is not None:   # under DeepSpeed bf16 the head's weights are bf16
                        head_input = head_input.to(next(raw.heads[m].parameters()).dtype)
                    own = common.task_loss(task, raw.heads[m](head_input).float(), labels)
                    own_grad = common.flat_grad(raw.heads[m].parameters(), own, accelerator)
                    scalars[f"{m}/loss"] = common.task_loss(task, logits.detach().float(), labels)
                    if task == "classification":
                        scalars[f"{m}/acc"] = (logits.argmax(1) == labels).float().mean()
                    if engine is None:
                        scalars[f"{m}/grad_norm_encoder"] = common.grad_norm(raw.encoders[m])
                    else:
                        scalars[f"{m}/grad_norm_encoder"] = encoder_norms[m]
                    scalars[f"{m}/cos_head_grad_own_vs_fused"] = F.cosine_similarity(
                        own_grad.float(), fused_head_grads[m], dim=0, eps=1e-12)
                scalars = {k: accelerator.reduce(v.detach().float(), "mean") for k, v in scalars.items()}
                scalars["train/lr"] = optimizer.param_groups[0]["lr"]
                common.log_scalars(writer, scalars, state["step"] + 1)
                if accelerator.is_main_process:
                    bar.set_postfix(loss=f"{float(scalars['train/loss']):.4f}")
            optimizer.step()   # a no-op under DeepSpeed (Accelerate's wrapper); the engine steps:
            if engine is not None:
                engine.step()

            state["step"] += 1
            state["batch_in_epoch"] += 1
            if common.checkpoint_at_step_boundary(cfg, state, preemption, nonfinite, run_dir, accelerator,
                                                  checkpointed):
                return {"stopped_at_step": state["step"], "run_dir": str(run_dir)}
        bar.close()

        # end of epoch: validate, keep the best model, checkpoint ----------------------------------
        common.check_finite(nonfinite, state["step"], cfg["log_every"], accelerator)
        scheduler.step()
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
        if state["epoch"] % cfg["eval_every"] == 0 or state["epoch"] == cfg["epochs"]:
            val = common.evaluate(model, val_loader, accelerator, task, LateFusionModel.fuse)
            common.log_scalars(writer, {f"val_{k}/{name}": v for k, mets in val.items() for name, v in mets.items()},
                               state["step"])
            common.append_jsonl(run_dir, {"epoch": state["epoch"], "step": state["step"], "val": val}, accelerator)
            score = common.selection_score(val, cfg["select_on"], select_key)
            if state["best"] is None or better(score, state["best"]):
                state["best"], state["best_epoch"] = score, state["epoch"]
                if engine is not None:   # float32 master weights, gathered from the ZeRO partitions
                    common.save_deepspeed_model_atomic(raw, run_dir / "best.pt", accelerator)
                elif accelerator.is_main_process:
                    common.save_model_atomic(raw, run_dir / "best.pt")
            accelerator.print(f"epoch {state['epoch']}: val " +
                              "  ".join(f"{k} {v[select_key]:.4f}" for k, v in val.items()))
        common.save_checkpoint(run_dir, accelerator, checkpointed, state, cfg["keep_checkpoints"])

    # test with the model selected on validation ----------------------------------------------------
    return common.test_best_model(model, run_dir, accelerator, task, LateFusionModel.fuse,
                                  {"val": val_loader, "test": test_loader}, meta, state, writer, select_key,
                                  select_on=cfg["select_on"], select_metric=select_key)


if __name__ == "__main__":
    common.run_entry_point(main, DEFAULTS, DEFAULT_CONFIG)
