"""What both tokenwire services share: the gRPC server lifecycle, TLS and auth, the request guard, RPC
metrics and observation, logging, flags generated from config dataclasses, the health-check command, the
model resolver, the local process launcher, and the one field error with the wire metadata names.

Depends only on the contracts (`tokenwire.v1`) and libraries; it never imports a service. Keep this file
empty of imports: the SDK imports `tokenwire.serving.errors` and must stay light.
"""
