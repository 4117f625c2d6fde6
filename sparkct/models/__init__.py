"""Compositions: the backbone builder, the SparK cell-mask generator, pretraining methods."""
