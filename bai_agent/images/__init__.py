"""
Images from registries (docs/protocol.md section 8).

- ``references``: image references, checked before anything reaches Docker;
- ``credentials``: registry credentials (a request's, or the operator's in etcd), kept out
  of every log line, event and message;
- ``pulls``: shared pulls with their events, timeouts and error codes.
"""
