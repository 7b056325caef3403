"""Instruction-data contribution: which instruction samples are worth training on."""
