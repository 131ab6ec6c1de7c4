"""The Hugging Face GPT-2 trainer and evaluator behind scripts/run_gpt2.py."""
