"""The study's experiments, one command each: ablation, hyperparameter search, k-fold validation.

  python -m se_resnet_jax.experiments.ablation --config=configs/cifar10.py --workdir=runs/ablation
  python -m se_resnet_jax.experiments.search --config=configs/cifar10.py --workdir=runs/search
  python -m se_resnet_jax.experiments.kfold --config=configs/cifar10.py --workdir=runs/kfold

Every run of an experiment lives in its own subdirectory of the workdir, so rerunning an interrupted
command skips the finished runs and resumes the unfinished one from its checkpoints.
"""
