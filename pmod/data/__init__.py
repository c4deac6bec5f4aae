"""Training and evaluation data: LLaVA-format records and their encoding, conversations and chat templates,
and the synthetic shapes dataset of the demo."""
