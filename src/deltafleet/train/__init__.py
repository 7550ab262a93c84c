"""Fine-tuning on transformers + peft: `config.TrainConfig`, `recipe.train`, the method registry
`methods.METHODS` (lora, road, ia3, full; pafi, hiwi, meft in their own modules), resumable pickle-free
checkpoints, and `deltafleet train`.

Kept import-free so that `deltafleet --help` stays fast; import the submodules.
"""
