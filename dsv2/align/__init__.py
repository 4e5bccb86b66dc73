"""Alignment: supervised fine-tuning on conversations and GRPO reinforcement learning."""
