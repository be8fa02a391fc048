"""Render deploy/nginx/cirrus.conf for a set of replicas.

  python deploy/nginx/render.py --upstream 10.0.0.5:8000 --upstream 10.0.0.6:8000 \
      --listen 8080 --prefix /srv/cirrus-nginx > /srv/cirrus-nginx/nginx.conf
  nginx -p /srv/cirrus-nginx -c /srv/cirrus-nginx/nginx.conf -g 'daemon off;'
"""

import argparse
import os

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cirrus.conf")


def render_nginx_conf(
    upstreams: list[str],
    listen: int | str,
    prefix: str,
    *,
    max_fails: int = 2,
    fail_timeout_s: int = 10,
    user: str | None = None,
) -> str:
    """The nginx.conf text for `upstreams` ("host:port" each).

    listen: a port (nginx then listens on every address) or "host:port", e.g. "127.0.0.1:8080".
    prefix: an absolute directory for the pid file, logs and temporary files.
    user: the `user` directive (only meaningful when nginx starts as root); None omits it.
    """
    if not upstreams:
        raise ValueError("render_nginx_conf needs at least one upstream (host:port)")
    if not os.path.isabs(prefix):
        raise ValueError(f"prefix must be an absolute directory, got {prefix!r}")
    servers = "\n".join(
        f"        server {address} max_fails={max_fails} fail_timeout={fail_timeout_s}s;"
        for address in upstreams
    )
    with open(TEMPLATE) as f:
        text = f.read()
    text = text.replace("__USER__", f"user {user};" if user else "# user: nginx's default.")
    text = text.replace("__UPSTREAM_SERVERS__", servers)
    text = text.replace("__LISTEN__", str(listen))
    return text.replace("__PREFIX__", prefix.rstrip("/") or "/")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", action="append", required=True, help="host:port, repeat")
    parser.add_argument("--listen", default="8080", help="port or host:port")
    parser.add_argument("--prefix", required=True, help="absolute dir: pid, logs, temp files")
    parser.add_argument("--max_fails", type=int, default=2)
    parser.add_argument("--fail_timeout_s", type=int, default=10)
    parser.add_argument("--user", default=None)
    args = parser.parse_args()
    print(
        render_nginx_conf(
            args.upstream,
            args.listen,
            os.path.abspath(args.prefix),
            max_fails=args.max_fails,
            fail_timeout_s=args.fail_timeout_s,
            user=args.user,
        ),
        end="",
    )


if __name__ == "__main__":
    main()
