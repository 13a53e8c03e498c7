"""Decoding uploaded media (images, videos) with limits and a memory budget: used by serving and training."""
