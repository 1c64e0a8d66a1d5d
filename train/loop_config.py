"""The keys every script has: those of the shared loop (train/loop.py) — data, run directory, optimiser
and scheduler, evaluation and model selection, logging, checkpoints and preemption. A script's
CONFIG is `declare(LOOP_CONFIG, ...)`: its own keys, and new defaults for these. Kept apart from
train/loop.py (no torch here) so that `python train/<script>.py --help` answers at once."""
from train.config import Key, declare

POSITIVE, NON_NEGATIVE = dict(above=0), dict(at_least=0)

LOOP_CONFIG = declare(
    data=Key("data/embedded_imgtab", "a shard directory; a missing embedded_<flavour> is generated"),
    data_seed=Key(0, "seed of the embedded generator", **NON_NEGATIVE),
    modalities=Key([], "the modalities to train, in the method's order ([] = the dataset's)"),
    encoders=Key({}, "per-modality encoder config (models.encoders.build_encoder)"),
    standardize=Key(False, "float modalities as (x - mean) / std, meta.json's train statistics "
                           "(data_prep.from_arrays)"),
    out_dir=Key("runs/run", "the run directory: config.yaml, checkpoints/, tb/, best.pt, result.json"),
    seed=Key(0, "seed of the model's initialisation, the data order and the method's randomness", **NON_NEGATIVE),
    resume=Key(False, "continue the run in out_dir from its latest checkpoint"),
    epochs=Key(15, "training epochs", **POSITIVE),
    batch_size=Key(128, "global batch (split across ranks)", **POSITIVE),
    eval_batch_size=Key(500, "validation and test batch", type=int, **POSITIVE),
    num_workers=Key(0, "DataLoader worker processes per rank", **NON_NEGATIVE),
    optimizer=Key("adam", "adam | adamw | sgd"),
    lr=Key(1e-3, "learning rate", **POSITIVE),
    weight_decay=Key(1e-4, "the optimiser's weight decay", **NON_NEGATIVE),
    momentum=Key(0.9, "sgd only", **NON_NEGATIVE),
    betas=Key([0.9, 0.999], "adam / adamw"),
    scheduler=Key("none", "none | step | cosine | warmup_cosine | plateau (stepped per epoch)"),
    step_size=Key(10, "step: StepLR(step_size, gamma)", **POSITIVE),
    gamma=Key(0.1, "step: decay factor; plateau: reduction factor", **POSITIVE),
    plateau_patience=Key(10, "plateau: validations without improvement of the val loss", **NON_NEGATIVE),
    warmup_epochs=Key(10, "warmup_cosine: warmup_start_lr -> lr over warmup_epochs, then cosine to min_lr",
                      **NON_NEGATIVE),
    warmup_start_lr=Key(0.0, "warmup_cosine: the first epoch's learning rate", **NON_NEGATIVE),
    min_lr=Key(0.0, "cosine, warmup_cosine: the last epoch's learning rate", **NON_NEGATIVE),
    eval_every=Key(1, "epochs between validations (the last epoch is always validated)", **POSITIVE),
    select_on=Key("fused", "best model by validation: fused | modality_mean"),
    select_metric=Key("acc", "classification: acc | macro_f1 (regression: MAE, segmentation: mean Dice)"),
    patience=Key(0, "early stopping after this many validations without improvement (0 = off)", **NON_NEGATIVE),
    min_delta=Key(0.0, "an improvement must exceed this", **NON_NEGATIVE),
    mixed_precision=Key("no", "no | bf16"),
    cpu=Key(False, "force CPU even where CUDA exists"),
    compile=Key("none", "none | encoders (torch.compile of each encoder) | step (the whole step; CUDA graphs on "
                        "CUDA): opt-in, not bit-identical to eager (train/capture.py)",
                choices=("none", "encoders", "step")),
    log_every=Key(25, "steps between TensorBoard scalars (and the NaN check)", **POSITIVE),
    report_to=Key("tensorboard", "tensorboard | wandb | mlflow | all | none; a comma-separated list is accepted"),
    ckpt_every_steps=Key(0, "also checkpoint every N steps inside an epoch (0 = at epoch ends only)", **NON_NEGATIVE),
    keep_checkpoints=Key(2, "complete checkpoints kept (the newest)", **POSITIVE),
    preempt_check_every=Key(10, "steps between checks for SIGTERM/SIGUSR1 across ranks (one all-reduce each)",
                            **POSITIVE),
    stop_after_steps=Key(0, "checkpoint and exit at this step, as a preempted job would (0 = off)", **NON_NEGATIVE),
    progress=Key(True, "tqdm bar on rank 0, when its stderr is a terminal (not in SLURM logs)"),
)
