"""``lowbit train``: quantization-aware fine-tuning of a built-in model, on one process or many.

::

    from lowbit.train import RunConfig, run, spawn
    result = run(RunConfig(model="mnist1d", weights=2, activations=8, epochs=5), "runs/w2a8")
    results = spawn(2, RunConfig(...), "runs/w2a8-ddp")          # 2 processes, DDP over gloo/nccl

:mod:`lowbit.train.run` has the recipe (PTQ init, then QAT with :mod:`lowbit.qat`), per-epoch
atomic checkpoints and exact resume; :mod:`lowbit.train.launch` starts processes (or joins
``torchrun``'s); :mod:`lowbit.train.checkpoint` the checkpoint file and its refusal rules.
"""
from .checkpoint import CHECKPOINT_NAME, read_checkpoint
from .config import RunConfig, model_fingerprint, recipe_differences
from .launch import default_backend, free_port, init_from_env, spawn
from .run import MODEL_FILE, RESULT_FILE, TrainingStopped, run

__all__ = ["RunConfig", "run", "spawn", "init_from_env", "free_port", "default_backend", "TrainingStopped",
           "read_checkpoint", "recipe_differences", "model_fingerprint", "CHECKPOINT_NAME", "MODEL_FILE",
           "RESULT_FILE"]
