"""Prediction outside training: the predictor, where stitching buffers live, fold ensembles, postprocessing,
reading and writing cases."""
