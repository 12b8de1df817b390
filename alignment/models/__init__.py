"""Model sources, checkpoint facts, loading (LoRA/QLoRA), starting points, chat templates, the tiny twins."""
