"""Building the shipped demo: pre-training the tiny BLIP and training its adapter sets (weights land in model/demo/)."""
