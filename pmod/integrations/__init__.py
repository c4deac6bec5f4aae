"""pmod and other projects: lmms-eval (a model plugin) and the original p-MoD checkpoints (conversion)."""
