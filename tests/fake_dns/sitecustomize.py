"""Test-only, never part of the product: put on PYTHONPATH of a Cog server that a test starts, it
makes the names in FLUX_TEST_HOSTS ("name=127.0.0.1,other=::1") resolve to those loopback
addresses in the server's processes, so look-alike hosts can be tried without leaving the machine."""

import os
import socket

_HOSTS = dict(item.split("=", 1) for item in os.environ.get("FLUX_TEST_HOSTS", "").split(",") if "=" in item)

if _HOSTS:
    _resolve = socket.getaddrinfo

    def _getaddrinfo(host, *args, **kwargs):
        return _resolve(_HOSTS.get(host, host) if isinstance(host, str) else host, *args, **kwargs)

    socket.getaddrinfo = _getaddrinfo
