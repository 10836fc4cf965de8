"""Bouquet's Flower workloads: the built-in tabular task and its server and client apps."""
