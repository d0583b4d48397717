"""Prediction outside training: inference precision, fold ensembles, postprocessing, reading and writing cases."""
