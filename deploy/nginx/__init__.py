"""nginx in front of launch.serve replicas: cirrus.conf (template) and render.py."""

from deploy.nginx.render import render_nginx_conf

__all__ = ["render_nginx_conf"]
