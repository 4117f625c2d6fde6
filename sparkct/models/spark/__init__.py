"""SparK: sparse, hierarchical masked modelling for CNNs (the decoder, the model, its reference)."""
