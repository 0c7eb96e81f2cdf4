"""LoRA fine-tuning of a frozen base model: `jlora train` (see `jlora.train.trainer.train`)."""

SCHEDULES = ("cosine", "constant", "linear")  # learning rate after warmup
