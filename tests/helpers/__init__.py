"""Test helpers shared by test folders: tiny models, adapters, HF + PEFT references."""
