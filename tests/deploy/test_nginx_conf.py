"""deploy/nginx: the rendered configuration holds the load-balancing directives and nginx
itself accepts it (`nginx -t`, when nginx is installed)."""

import os
import shutil
import subprocess

import pytest

from deploy.nginx import render_nginx_conf

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def test_render_lists_every_upstream_with_passive_health_checks(tmp_path):
    text = render_nginx_conf(["127.0.0.1:9001", "127.0.0.1:9002"], 9000, str(tmp_path))
    assert "server 127.0.0.1:9001 max_fails=2 fail_timeout=10s;" in text
    assert "server 127.0.0.1:9002 max_fails=2 fail_timeout=10s;" in text
    assert "listen 9000;" in text
    for directive in (
        "least_conn;",
        "proxy_buffering off;",
        "proxy_cache off;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header Authorization $http_authorization;",
        "proxy_next_upstream error timeout http_502 http_503",
        "client_max_body_size",
        "X-Accel-Buffering",
        "keepalive ",
    ):
        assert directive in text, directive
    assert "__" not in text.replace("proxy_", ""), "a placeholder was left unrendered"
    assert str(tmp_path) + "/nginx.pid" in text


def test_render_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="upstream"):
        render_nginx_conf([], 9000, str(tmp_path))
    with pytest.raises(ValueError, match="absolute"):
        render_nginx_conf(["127.0.0.1:9001"], 9000, "relative/dir")


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed: apt-get install -y nginx")
def test_nginx_accepts_the_rendered_config(tmp_path):
    user = "root" if os.geteuid() == 0 else None
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        render_nginx_conf(
            ["127.0.0.1:9001", "127.0.0.1:9002"], "127.0.0.1:9000", str(tmp_path), user=user
        )
    )
    result = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
