"""The backend's control protocol: bind, unbind and status on a unix socket,
for the CLI, the pool and the libvirt hooks.

``messages`` (the requests and replies, parsed and checked in one place, no
I/O), ``client`` (one request, one answer), ``target`` (a bind request made
into an agent target: reads the PSK, loads the TLS files) and ``server`` (the
backend's side). A client imports ``messages`` and ``client`` only: neither
loads the device model nor the C module. This file re-exports nothing, so
importing one module does not load the others.
"""
