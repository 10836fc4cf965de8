"""Bouquet: Kubernetes-native federated learning with Flower and PyTorch."""
