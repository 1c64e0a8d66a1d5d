"""The training scripts: one flat file per method and baseline on the shared loop (train/loop.py)."""

#: Every training script (train/<name>.py), in the order the documentation lists them. The launchers
#: (slurm/submit.py reads this line without importing the package, slurm/train.sbatch accepts any
#: train/<name>.py) and the tests take the list from here; tests/test_package.py checks that it
#: names exactly the files of train/ that run a training entry point.
SCRIPTS = ("joint", "unimodal", "gaal", "igm", "cggm", "ogm_ge", "mla", "mmpareto")
