"""Deployment: nginx (load-balancer config + renderer), k8s manifests, the Dockerfile."""
