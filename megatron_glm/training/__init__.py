"""Training: CLI -> validated config (``arguments``), DeepSpeed JSON (``ds_config``), the engine
and one iteration (``engine``; pipeline wiring in ``pipeline``), the loop (``loop``), checkpoints
(``checkpointing``), the LR schedule (``lr_schedule``), logging outputs (``metrics``) and the
process-group start-up (``launch``). Submodules are imported on demand (DeepSpeed is slow to
import). See docs/training.md.
"""
