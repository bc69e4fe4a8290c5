"""The local GPU backend: one FLUX.2 [klein] 4B pipeline on one device, served over HTTP.

`klein-local serve --model PATH | --tiny` starts it (see `local_backend.cli`). The
wire API lives in `local_backend.schemas`, which imports no torch, so the gateway
can speak it without the GPU stack installed. Nothing here imports torch at
module import time except `local_backend.pipeline`.
"""
