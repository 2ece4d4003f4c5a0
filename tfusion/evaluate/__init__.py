"""Evaluation: FID, CLIP score, captioning, perplexity, multiple choice."""
