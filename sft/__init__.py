"""sft: supervised finetuning of instruction-following language models."""
