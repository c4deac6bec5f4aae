"""What users run on a p-MoD model: training (full or LoRA), evaluation, generation, chat, kept-token maps, the demo."""
